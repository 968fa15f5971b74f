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
//! whole group keep the plain layout; each one's partial dots are summed across its vector (the
//! integer sums are exact) into the lane it would have had in a group. So every path does the
//! same arithmetic: block b's exact dot, times its two scales, is added to lane b mod 8, and the
//! eight lanes are summed at the end. That is also what the tile path (`qgemm_amx`) computes,
//! one whole block per tile product.
//!
//! Activations are quantized for the kernel that will run them (`QuantRows` records which). For
//! VNNI they are stored *biased* (each byte read unsigned is the value + 128), the operand its
//! unsigned-by-signed product wants as it is. The bias adds 128 · Σw over each lane's bytes,
//! which depends only on the weights, so VNNI takes it off with one more product per weight
//! vector, shared by every activation row of the tile. AVX2 keeps them signed: its product moves
//! each weight's sign onto the activation byte, which needs the byte signed, and unbiasing it in
//! the kernel would cost one more instruction per activation vector.
//!
//! Every path computes each lane's integer partial dot exactly and combines them in the same
//! order, so a row's result does not depend on the batch it ran in, nor on which of the x86
//! paths ran it.
#![allow(unsafe_code)]

use candle_core::{Device, Result, Tensor};

use super::qgemm_amx;

pub const BLOCK: usize = 32;
/// Blocks interleaved together: one int32 lane each in a 256-bit vector.
pub(super) const GROUP: usize = 8;
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
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    if let (Ok(src), Ok(dst)) = (
        <&[f32; BLOCK]>::try_from(src),
        <&mut [i8; BLOCK]>::try_from(&mut *dst),
    ) {
        return x86::quantize_block(src, dst);
    }
    quantize_block_portable(src, dst)
}

/// `quantize_block` without vector instructions (for any length).
fn quantize_block_portable(src: &[f32], dst: &mut [i8]) -> f32 {
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
pub(super) fn interleaved_index(b: usize, e: usize, nb: usize) -> usize {
    let whole = nb / GROUP * GROUP;
    if b >= whole {
        return b * BLOCK + e;
    }
    let (g, j) = (b / GROUP, b % GROUP);
    g * GROUP_BYTES + (e / LANE) * (GROUP * LANE) + j * LANE + e % LANE
}

/// Byte pattern that biases a quantized activation (q ^ BIAS, read unsigned, is q + 128).
const BIAS: i8 = i8::MIN;

/// Quantizes one row of `cols` values into interleaved int8 `dst` (each byte xor `bias`: 0 for
/// weights, `BIAS` for activations) and its block scales; and into `natural`, when given, block
/// after block with no bias (the tiles' order).
fn quantize_row(
    src: &[f32],
    dst: &mut [i8],
    scales: &mut [f32],
    bias: i8,
    mut natural: Option<&mut [i8]>,
) {
    let nb = src.len() / BLOCK;
    let whole = nb / GROUP * GROUP;
    let mut block = [0i8; BLOCK];
    for b in 0..nb {
        scales[b] = quantize_block(&src[b * BLOCK..(b + 1) * BLOCK], &mut block);
        if let Some(n) = natural.as_deref_mut() {
            n[b * BLOCK..(b + 1) * BLOCK].copy_from_slice(&block);
        }
        if bias != 0 {
            block.iter_mut().for_each(|q| *q ^= bias);
        }
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
            let f = super::cpu::features();
            if f.avx512vnni && f.avx512vl {
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

    /// What this kernel's activations are stored xor'ed with (see the module comment).
    fn bias(self) -> i8 {
        match self {
            #[cfg(all(
                target_arch = "x86_64",
                target_feature = "avx2",
                target_feature = "fma"
            ))]
            Kernel::Vnni => BIAS,
            _ => 0,
        }
    }

    /// How many rows of x share one pass over a weight row when `left` rows remain: the
    /// widest tile this kernel has that fits (at most `MAX_TILE`).
    fn tile(self, left: usize) -> usize {
        let tiles: &[usize] = match self {
            Kernel::Portable => &[1],
            #[cfg(all(
                target_arch = "x86_64",
                target_feature = "avx2",
                target_feature = "fma"
            ))]
            Kernel::Avx2 => &[8, 4, 2, 1],
            #[cfg(all(
                target_arch = "x86_64",
                target_feature = "avx2",
                target_feature = "fma"
            ))]
            Kernel::Vnni => &[8, 4, 2, 1],
        };
        tiles.iter().copied().find(|&t| t <= left).unwrap_or(1)
    }
}

const MAX_TILE: usize = 8;

/// Activations quantized for one kernel: `m` rows of `cols` values, stored as that kernel reads
/// them (biased or not; see the module comment).
pub struct QuantRows {
    m: usize,
    cols: usize,
    quants: Vec<i8>,
    scales: Vec<f32>,
    kernel: Kernel,
    /// The same rows in the tiles' order, written by the same pass when a batch will run on
    /// them (`qgemm_amx::MIN_ROWS` rows or more on a host with the tiles).
    natural: Option<qgemm_amx::Natural>,
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
        for ((s, q), src) in scales
            .chunks_mut(nb)
            .zip(quants.chunks_mut(cols))
            .zip(data.chunks(cols))
        {
            quantize_row(src, q, s, 0, None);
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
        let xq = QuantRows::parallel_for(&xv, m, cols, kernel)?;
        let y = self.product(&xq)?;
        Tensor::from_vec(y, (m, self.rows), &Device::Cpu)
    }

    /// Quantized activations (m, cols) → (m, rows), row-major, on the worker pool, with the
    /// kernel they were quantized for. Callers that also need the activations elsewhere (LoRA)
    /// quantize them once for both.
    ///
    /// Batches of `qgemm_amx::MIN_ROWS` rows or more run on AMX-INT8 tiles where the CPU has
    /// them, with the same bits.
    pub fn product(&self, xq: &QuantRows) -> Result<Vec<f32>> {
        // A width mismatch is not run on tiles; the vector path reports it.
        if xq.m >= qgemm_amx::MIN_ROWS {
            if let Some(y) = self.product_on_tiles(xq) {
                return Ok(y);
            }
        }
        self.product_on_vectors(xq)
    }

    /// `product` with the vector (or portable) kernel the activations were quantized for.
    fn product_on_vectors(&self, xq: &QuantRows) -> Result<Vec<f32>> {
        let kernel = xq.kernel;
        if xq.cols != self.cols {
            candle_core::bail!(
                "Q8 matmul: input has {} columns, matrix has {}",
                xq.cols,
                self.cols
            );
        }
        let m = xq.m;
        // Activation rows in tiles, each as wide as the kernel takes.
        let mut tiles = Vec::new();
        let mut i = 0;
        while i < m {
            let r = kernel.tile(m - i);
            tiles.push((i, r));
            i += r;
        }
        // Output columns (weight rows) are shared out on candle's own worker pool (a second
        // pool would fight it for the same cores), in spans of `SPAN_ROWS` whose weights stay in
        // the first-level cache while every tile passes over them.
        let n = self.rows;
        let mut y = vec![0f32; m * n];
        let out = SharedOut(y.as_mut_ptr());
        let out = &out;
        candle_core::utils::barrier_pool().execute_chunked(n, |range| {
            let mut start = range.start;
            while start < range.end {
                let rows = start..range.end.min(start + SPAN_ROWS);
                for (t, &(i, r)) in tiles.iter().enumerate() {
                    // The first tile also asks for the weights ahead.
                    // SAFETY: rows i..i + r of the output and its columns `rows` lie inside
                    // `y` (i + r <= m, rows.end <= n), which outlives the pool call;
                    // execute_chunked hands each weight row (one output column) to one worker
                    // only, so no element is written twice.
                    unsafe {
                        dot_span(
                            &self.quants,
                            &self.scales,
                            self.cols,
                            rows.clone(),
                            xq,
                            (i, r),
                            (out.0.add(i * n + rows.start), n),
                            t == 0,
                        )
                    };
                }
                start = rows.end;
            }
        });
        Ok(y)
    }

    /// `product` on AMX-INT8 tiles (`qgemm_amx`), whatever the batch; `None` where they cannot
    /// run.
    fn product_on_tiles(&self, xq: &QuantRows) -> Option<Vec<f32>> {
        if xq.cols != self.cols {
            return None;
        }
        qgemm_amx::product(
            &qgemm_amx::Weights {
                quants: &self.quants,
                scales: &self.scales,
                rows: self.rows,
                cols: self.cols,
            },
            &qgemm_amx::Inputs {
                quants: &xq.quants,
                scales: &xq.scales,
                m: xq.m,
                bias: xq.kernel.bias(),
            },
            xq.natural.as_ref(),
        )
    }

    /// Input width.
    pub fn input(&self) -> usize {
        self.cols
    }
}

/// Weight rows a worker takes in one span (at 576 columns, 9 KB of weights).
const SPAN_ROWS: usize = 16;

/// How far ahead of the weight row a kernel is on it asks for the weights (the hardware's own
/// prefetch keeps up with one activation row but not with a tile of several).
const PREFETCH_BYTES: usize = 4096;

/// Asks the CPU to start reading `data` into its second-level cache, a line at a time. (Into the
/// first level, a task's adapter matrices would evict each other.)
pub(super) fn prefetch_l2<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let p = data.as_ptr().cast::<i8>();
        for at in (0..std::mem::size_of_val(data)).step_by(64) {
            // SAFETY: `at` is inside `data`; a prefetch reads nothing architecturally.
            unsafe {
                use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
                _mm_prefetch::<_MM_HINT_T1>(p.add(at));
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// The output buffer, shared with the worker pool for disjoint writes.
struct SharedOut(*mut f32);
// SAFETY: workers write disjoint output columns (see `Q8Matrix::product`), so sharing the
// pointer races on nothing.
unsafe impl Sync for SharedOut {}

impl QuantRows {
    /// Quantizes `m` rows of `cols` values (a multiple of 32) for this CPU's fastest kernel, on
    /// the worker pool for batches.
    pub fn parallel(x: &[f32], m: usize, cols: usize) -> Result<Self> {
        Self::parallel_for(x, m, cols, Kernel::best())
    }

    fn parallel_for(x: &[f32], m: usize, cols: usize, kernel: Kernel) -> Result<Self> {
        if !cols.is_multiple_of(BLOCK) || x.len() != m * cols {
            candle_core::bail!(
                "Q8 activations: {} values for {m} rows of {cols} (a multiple of {BLOCK})",
                x.len()
            );
        }
        if m < 4 {
            return Ok(Self::new_for(x, m, cols, kernel));
        }
        let nb = cols / BLOCK;
        let mut rows = Self::zeroed(m, cols, kernel);
        let bias = kernel.bias();
        let mut natural = (m >= qgemm_amx::MIN_ROWS && qgemm_amx::usable())
            .then(|| qgemm_amx::Natural::zeroed(m, cols));
        let mut tile_rows: Vec<Option<&mut [i8]>> = match natural.as_mut() {
            Some(a) => a.bytes_mut().chunks_mut(cols).take(m).map(Some).collect(),
            None => (0..m).map(|_| None).collect(),
        };
        // One writer per row.
        let work: Vec<_> = x
            .chunks(cols)
            .zip(rows.quants.chunks_mut(cols))
            .zip(rows.scales.chunks_mut(nb))
            .zip(tile_rows.iter_mut())
            .map(std::sync::Mutex::new)
            .collect();
        candle_core::utils::barrier_pool().execute_chunked(work.len(), |range| {
            for cell in &work[range] {
                if let Ok(mut guard) = cell.lock() {
                    let (((src, q), s), tiles) = &mut *guard;
                    quantize_row(src, q, s, bias, tiles.as_deref_mut());
                }
            }
        });
        drop(work);
        drop(tile_rows);
        if let Some(a) = natural.as_mut() {
            a.scales_mut()[..m * nb].copy_from_slice(&rows.scales);
        }
        rows.natural = natural;
        Ok(rows)
    }

    pub fn rows(&self) -> usize {
        self.m
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row t's bytes as stored, its block scales, and the pattern its bytes are xor'ed with
    /// (the kernel's bias; xor again to read them signed).
    pub(super) fn row(&self, t: usize) -> (&[i8], &[f32], i8) {
        let nb = self.cols / BLOCK;
        (
            &self.quants[t * self.cols..(t + 1) * self.cols],
            &self.scales[t * nb..(t + 1) * nb],
            self.kernel.bias(),
        )
    }

    /// Row `t` of these rows against every row of `other` (as wide): `out[i]` is what a
    /// `Q8Matrix` of `other`'s rows gives for input row t, bit for bit (the lane products are
    /// exact integers either way round). For small matrices (adapter factors) on the calling
    /// thread: row t takes the weights' place (unbiased into `scratch` if it is stored biased),
    /// tiled against `other`'s rows with `other`'s kernel.
    pub fn dots_with(&self, t: usize, other: &QuantRows, out: &mut [f32], scratch: &mut Vec<i8>) {
        let (cols, nb) = (self.cols, self.cols / BLOCK);
        if other.cols != cols || t >= self.m {
            return;
        }
        let kernel = other.kernel;
        let row = &self.quants[t * cols..(t + 1) * cols];
        let bias = self.kernel.bias();
        let w = if bias == 0 {
            row
        } else {
            scratch.clear();
            scratch.extend(row.iter().map(|&q| q ^ bias));
            &scratch[..]
        };
        let ws = &self.scales[t * nb..(t + 1) * nb];
        let n = other.m.min(out.len());
        let mut i = 0;
        while i < n {
            let r = kernel.tile(n - i);
            // SAFETY: one weight row, so the writes are out[i..i + r], inside `out` (i + r <= n),
            // which this call borrows mutably.
            unsafe {
                dot_span(
                    w,
                    ws,
                    cols,
                    0..1,
                    other,
                    (i, r),
                    (out[i..].as_mut_ptr(), 1),
                    false,
                )
            };
            i += r;
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.quants.len() + self.scales.len() * 4
    }

    /// Asks the CPU to start reading all of these rows into its second-level cache.
    pub fn prefetch(&self) {
        prefetch_l2(&self.quants);
        prefetch_l2(&self.scales);
    }

    fn zeroed(m: usize, cols: usize, kernel: Kernel) -> Self {
        let nb = cols / BLOCK;
        QuantRows {
            m,
            cols,
            quants: vec![0i8; m * cols],
            scales: vec![0f32; m * nb],
            kernel,
            natural: None,
        }
    }

    /// Quantizes `m` rows of `cols` values (a multiple of 32) for this CPU's fastest kernel, on
    /// the calling thread.
    pub fn new(x: &[f32], m: usize, cols: usize) -> Self {
        Self::new_for(x, m, cols, Kernel::best())
    }

    fn new_for(x: &[f32], m: usize, cols: usize, kernel: Kernel) -> Self {
        let nb = cols / BLOCK;
        let mut rows = Self::zeroed(m, cols, kernel);
        let bias = kernel.bias();
        for ((src, q), s) in x
            .chunks(cols)
            .take(m)
            .zip(rows.quants.chunks_mut(cols))
            .zip(rows.scales.chunks_mut(nb))
        {
            quantize_row(src, q, s, bias, None);
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
}

impl QuantVec {
    /// Quantizes `v`, padding it with zeros to `width` values (at least `v.len()`).
    pub fn new(v: &[f32], width: usize) -> Self {
        let mut quants = vec![0i8; width.max(v.len())];
        let scale = quantize_block(v, &mut quants[..v.len()]);
        Self { quants, scale }
    }

    /// The bytes and their scale.
    pub fn parts(&self) -> (&[i8], f32) {
        (&self.quants, self.scale)
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

    /// Asks the CPU to start reading the whole matrix into its second-level cache.
    pub fn prefetch(&self) {
        prefetch_l2(&self.quants);
        prefetch_l2(&self.scales);
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
                match (kernel == Kernel::Vnni, chunks) {
                    (true, 2) => x86::narrow_vnni::<2>(w, d, q, v.scale, chunks, n, y),
                    (true, 4) => x86::narrow_vnni::<4>(w, d, q, v.scale, chunks, n, y),
                    (true, 8) => x86::narrow_vnni::<8>(w, d, q, v.scale, chunks, n, y),
                    (true, _) => x86::narrow_vnni::<0>(w, d, q, v.scale, chunks, n, y),
                    (false, 2) => x86::narrow_avx2::<2>(w, d, q, v.scale, chunks, n, y),
                    (false, 4) => x86::narrow_avx2::<4>(w, d, q, v.scale, chunks, n, y),
                    (false, 8) => x86::narrow_avx2::<8>(w, d, q, v.scale, chunks, n, y),
                    (false, _) => x86::narrow_avx2::<0>(w, d, q, v.scale, chunks, n, y),
                }
            },
        }
    }
}

/// Weight rows `rows` of `w` (row-major, `cols` bytes each, interleaved) and `ws` (their scales)
/// against activation rows `i..i + r` of `x` (`tile`, r a width `x`'s kernel has), with `x`'s
/// kernel: weight row j's result for activation row i + k goes to
/// `out.0[k · out.1 + j - rows.start]`.
/// `prefetch`: the x86 kernels also ask for the weights `PREFETCH_BYTES` ahead.
///
/// SAFETY (callers): `out` is valid for writes at every such index, and no other thread touches
/// them during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn dot_span(
    w: &[i8],
    ws: &[f32],
    cols: usize,
    rows: std::ops::Range<usize>,
    x: &QuantRows,
    tile: (usize, usize),
    out: (*mut f32, usize),
    prefetch: bool,
) {
    let nb = cols / BLOCK;
    let (i, r) = tile;
    let (out, stride) = out;
    let kernel = x.kernel;
    assert!(
        cols == nb * BLOCK
            && cols == x.cols
            && rows.end * cols <= w.len()
            && rows.end * nb <= ws.len()
            && i + r <= x.m
            && x.quants.len() >= x.m * cols
            && x.scales.len() >= x.m * nb
            && r <= MAX_TILE
            && kernel.tile(r) == r,
        "a tile of {r} rows for {kernel:?}"
    );
    let xq = &x.quants[i * cols..(i + r) * cols];
    let xs = &x.scales[i * nb..(i + r) * nb];
    match kernel {
        Kernel::Portable => {
            for (j, row) in rows.enumerate() {
                for k in 0..r {
                    let v = portable(
                        &w[row * cols..(row + 1) * cols],
                        &ws[row * nb..(row + 1) * nb],
                        &xq[k * cols..(k + 1) * cols],
                        &xs[k * nb..(k + 1) * nb],
                    );
                    // SAFETY: an index the caller vouches for.
                    unsafe { *out.add(k * stride + j) = v };
                }
            }
        }
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        ))]
        Kernel::Avx2 | Kernel::Vnni => {
            let span = x86::Span {
                w: w[rows.start * cols..].as_ptr(),
                ws: ws[rows.start * nb..].as_ptr(),
                rows: rows.len(),
                x: xq.as_ptr(),
                xs: xs.as_ptr(),
                nb,
                out,
                stride,
                prefetch,
            };
            // SAFETY: the assertion above bounds every read: `rows` whole weight rows and
            // their scales, r activation rows of `cols` bytes and `nb` scales from row i; the
            // writes are the caller's. Vnni is only chosen where the CPU reports avx512vnni and
            // avx512vl.
            unsafe {
                match (kernel, r) {
                    (Kernel::Vnni, 8) => x86::vnni::<8>(&span),
                    (Kernel::Vnni, 4) => x86::vnni::<4>(&span),
                    (Kernel::Vnni, 2) => x86::vnni::<2>(&span),
                    (Kernel::Vnni, _) => x86::vnni::<1>(&span),
                    (_, 8) => x86::avx2::<8>(&span),
                    (_, 4) => x86::avx2::<4>(&span),
                    (_, 2) => x86::avx2::<2>(&span),
                    _ => x86::avx2::<1>(&span),
                }
            }
        }
    }
}

/// The reference kernel, and the definition every other one matches bit for bit: block b's exact
/// integer dot, times `ws[b] · xs[b]`, is added (one fused multiply-add) to lane `b % GROUP`, in
/// block order; then the eight lanes are summed as `hsum8` does. `x` is signed, as
/// `Kernel::Portable` stores it.
fn portable(w: &[i8], ws: &[f32], x: &[i8], xs: &[f32]) -> f32 {
    let nb = ws.len();
    let mut lanes = [0f32; GROUP];
    for b in 0..nb {
        let dot: i32 = (0..BLOCK)
            .map(|e| {
                let at = interleaved_index(b, e, nb);
                i32::from(w[at]) * i32::from(x[at])
            })
            .sum();
        let lane = &mut lanes[b % GROUP];
        *lane = (dot as f32).mul_add(ws[b] * xs[b], *lane);
    }
    hsum8(lanes)
}

/// The horizontal sum the vector kernels do: halves, then quarters, then the last pair.
pub(super) fn hsum8(l: [f32; GROUP]) -> f32 {
    let q = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    let p = [q[0] + q[2], q[1] + q[3]];
    p[0] + p[1]
}

/// The vector kernels: a span of weight rows, each against `R` activation rows. Both come from one
/// macro body so they differ only in the block product and the bias; the helpers carry their own
/// target features so they inline into each kernel (a closure would not inherit the kernel's
/// features).
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
pub(super) mod x86 {
    use super::{BLOCK, GROUP, GROUP_BYTES, LANE, PREFETCH_BYTES};
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
        mul_avx2(acc, aw, _mm256_sign_epi8(x, w))
    }

    /// Sums eight floats in the order `super::hsum8` does.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(in crate::ops) fn hsum(a: __m256) -> f32 {
        let s4 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2)))
    }

    /// Signed activations (AVX2): nothing to take off.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn bias_none(c: __m256i, _w: __m256i) -> __m256i {
        c
    }

    /// Biased activations, VNNI: w needs no preparing.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn prep_signed(w: __m256i) -> (__m256i, __m256i) {
        (w, w)
    }

    /// VNNI: biased x (unsigned) times signed w, four products into each lane.
    #[inline]
    #[target_feature(enable = "avx2,avx512vnni,avx512vl")]
    fn dot_vnni_biased(acc: __m256i, _p: __m256i, w: __m256i, xb: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, xb, w)
    }

    /// VNNI: what the bias adds to each lane, 128 · Σw over the lane's bytes.
    #[inline]
    #[target_feature(enable = "avx2,avx512vnni,avx512vl")]
    fn bias_vnni(c: __m256i, w: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(c, _mm256_set1_epi8(super::BIAS), w)
    }

    /// `super::quantize_block` for one whole block, eight values to a vector, with the same
    /// results for finite values: the same maximum, scale and products, rounded half away from
    /// zero (adding the float just below one half, with the sign of the value, then truncating,
    /// rounds exactly as `f32::round` does) and clamped the same way.
    pub(in crate::ops) fn quantize_block(src: &[f32; BLOCK], dst: &mut [i8; BLOCK]) -> f32 {
        // SAFETY: the loads read the 32 floats of `src` and the store writes the 32 bytes of
        // `dst`, in four and one unaligned 32-byte accesses; the cfg guarantees AVX2.
        unsafe {
            let sign = _mm256_set1_ps(-0.0);
            let p = src.as_ptr();
            let v = [0, 8, 16, 24].map(|o| _mm256_loadu_ps(p.add(o)));
            let a = v.map(|x| _mm256_andnot_ps(sign, x));
            let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
            let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps::<1>(m2, m2)));
            if amax == 0.0 {
                *dst = [0; BLOCK];
                return 0.0;
            }
            let d = amax / 127.0;
            let id = _mm256_set1_ps(1.0 / d);
            let half = _mm256_set1_ps(0.5f32.next_down());
            let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
            let q = v.map(|x| {
                let p = _mm256_mul_ps(x, id);
                let nudge = _mm256_or_ps(_mm256_and_ps(p, sign), half);
                let r = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(
                    _mm256_add_ps(p, nudge),
                );
                _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi))
            });
            // Packing works within 128-bit halves: four-value runs come out as 0 2 4 6 1 3 5 7.
            let packed = _mm256_packs_epi16(
                _mm256_packs_epi32(q[0], q[1]),
                _mm256_packs_epi32(q[2], q[3]),
            );
            let ordered =
                _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(dst.as_mut_ptr().cast(), ordered);
            d
        }
    }

    /// Lane t of the result is the sum of the eight lanes of `v[t]` (exact integer sums).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn sum_each(v: &[__m256i; GROUP]) -> __m256i {
        // Pairs, then fours, within each 128-bit half; then the halves of each block meet.
        let q0 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
        let q1 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
        _mm256_add_epi32(
            _mm256_permute2x128_si256::<0x20>(q0, q1),
            _mm256_permute2x128_si256::<0x31>(q0, q1),
        )
    }

    /// Lanes t < T of the result are the sums of the eight lanes of `v[t]`, as in `sum_each`;
    /// `v[T..]` is not read, and lanes from T on hold anything. A model whose width leaves one or
    /// two blocks past the last group (576 = 2 groups + 2 blocks) pays two horizontal adds per
    /// row here instead of six.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn sum_first<const T: usize>(v: &[__m256i; GROUP]) -> __m256i {
        let q = if T <= 2 {
            let h = _mm256_hadd_epi32(v[0], v[1]);
            _mm256_hadd_epi32(h, h)
        } else if T <= 4 {
            _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]))
        } else {
            return sum_each(v);
        };
        // Lane t of each 128-bit half holds half of v[t]'s sum: the halves meet.
        _mm256_add_epi32(q, _mm256_permute2x128_si256::<0x01>(q, q))
    }

    /// All ones in lanes below `n`, zero above.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn tail_mask(n: usize) -> __m256i {
        let n = n as i32;
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(n),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }

    /// What `super::dot_span` hands a kernel: `rows` interleaved weight rows (`nb` blocks each)
    /// from `w`, their scales from `ws`, R activation rows from `x` (stored as the kernel reads
    /// them) and their scales from `xs`; weight row j's result for activation row k goes to
    /// `out[k · stride + j]`.
    pub(super) struct Span {
        pub w: *const i8,
        pub ws: *const f32,
        pub rows: usize,
        pub x: *const i8,
        pub xs: *const f32,
        pub nb: usize,
        pub out: *mut f32,
        pub stride: usize,
        pub prefetch: bool,
    }

    macro_rules! kernel {
        ($name:ident, $features:literal, $prep:ident, $dot:ident, $bias:ident, $fence:literal) => {
            /// SAFETY (callers): the CPU has the features named below, and every pointer of
            /// `s` is valid for the extent `Span` describes, with R activation rows.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name<const R: usize>(s: &Span) {
                /// Blocks past the last whole group, `n` ≤ T of them, stored plain from
                /// `at.0` (weights; scales from `at.1`) and `at.2` (activation row 0; scales
                /// from `at.3`): block t's four-byte partial dots are summed across its vector
                /// into lane t (exact integer sums), then scaled into that lane alone, as in a
                /// whole group. Lanes from n on get a zero scale (masked loads), and a fused
                /// a · 0 + f is f itself for any f such a lane holds (it starts at +0 and never
                /// becomes -0), so they keep their bits without a blend.
                ///
                /// SAFETY (callers): the CPU has the kernel's features; the pointers are valid
                /// for n blocks of one weight row and of R activation rows `cols` bytes apart
                /// (scales `nb` apart).
                #[inline]
                #[target_feature(enable = $features)]
                unsafe fn tail_blocks<const R: usize, const T: usize>(
                    at: (*const i8, *const f32, *const i8, *const f32),
                    cols: usize,
                    nb: usize,
                    n: usize,
                    mut f: [__m256; R],
                ) -> [__m256; R] {
                    let (w, ws, x, xs) = at;
                    let zero = _mm256_setzero_si256();
                    // SAFETY: blocks below n of the rows the caller vouches for.
                    unsafe {
                        let load = |p: *const i8| _mm256_loadu_si256(p.cast());
                        let mut prepared = [(zero, zero); T];
                        let mut bias = [zero; GROUP];
                        for t in 0..T {
                            if t < n {
                                let wv = load(w.add(t * BLOCK));
                                bias[t] = $bias(zero, wv);
                                prepared[t] = $prep(wv);
                            }
                        }
                        let bias = sum_first::<T>(&bias);
                        let mask = tail_mask(n);
                        let wst = _mm256_maskload_ps(ws, mask);
                        for (r, fr) in f.iter_mut().enumerate() {
                            let mut dots = [zero; GROUP];
                            for (t, (d, &(p, q))) in dots.iter_mut().zip(&prepared).enumerate() {
                                if t < n {
                                    *d = $dot(zero, p, q, load(x.add(r * cols + t * BLOCK)));
                                }
                            }
                            let a = _mm256_sub_epi32(sum_first::<T>(&dots), bias);
                            let sc = _mm256_mul_ps(wst, _mm256_maskload_ps(xs.add(r * nb), mask));
                            *fr = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), sc, *fr);
                        }
                    }
                    f
                }

                let nb = s.nb;
                let cols = nb * BLOCK;
                let whole = nb / GROUP;
                let zero = _mm256_setzero_si256();
                let (x, xs) = (s.x, s.xs);
                // SAFETY: every pointer offset below stays within the extents the caller vouches
                // for: byte offsets below `cols` per row, block indices below `nb`, activation
                // rows below R, weight rows below `s.rows`. Prefetches do not fault, and their
                // addresses are only formed with wrapping arithmetic.
                unsafe {
                    let load = |p: *const i8| _mm256_loadu_si256(p.cast());
                    for j in 0..s.rows {
                        let w = s.w.add(j * cols);
                        let ws = s.ws.add(j * nb);
                        if s.prefetch {
                            let ahead = w.wrapping_add(PREFETCH_BYTES);
                            for line in (0..cols).step_by(64) {
                                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line));
                            }
                        }
                        let mut f = [_mm256_setzero_ps(); R];
                        for g in 0..whole {
                            let mut acc = [zero; R];
                            let mut bias = zero;
                            let base = g * GROUP_BYTES;
                            for c in 0..BLOCK / LANE {
                                let o = base + c * GROUP * LANE;
                                let wv = load(w.add(o));
                                bias = $bias(bias, wv);
                                let (p, q) = $prep(wv);
                                for (r, a) in acc.iter_mut().enumerate() {
                                    *a = $dot(*a, p, q, load(x.add(r * cols + o)));
                                }
                                if $fence {
                                    // An empty block the compiler must assume touches memory:
                                    // it keeps the next weight vector's load below this one's
                                    // products. Unrolled without it, the loop loads all eight
                                    // weight vectors (and their absolute values) first, more
                                    // than sixteen registers hold at four rows.
                                    std::arch::asm!("", options(nostack, preserves_flags));
                                }
                            }
                            let wsv = _mm256_loadu_ps(ws.add(g * GROUP));
                            for (r, (a, fr)) in acc.iter().zip(f.iter_mut()).enumerate() {
                                let a = _mm256_sub_epi32(*a, bias);
                                let xsv = _mm256_loadu_ps(xs.add(r * nb + g * GROUP));
                                let sc = _mm256_mul_ps(wsv, xsv);
                                *fr = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), sc, *fr);
                            }
                        }
                        // Tail blocks (fewer than a group, stored plain), in arrays of two,
                        // four or eight vectors so that they stay in registers.
                        let tail = nb - whole * GROUP;
                        let t0 = whole * GROUP;
                        let at = (w.add(t0 * BLOCK), ws.add(t0), x.add(t0 * BLOCK), xs.add(t0));
                        let f = match tail {
                            0 => f,
                            1..=2 => tail_blocks::<R, 2>(at, cols, nb, tail, f),
                            3..=4 => tail_blocks::<R, 4>(at, cols, nb, tail, f),
                            _ => tail_blocks::<R, 8>(at, cols, nb, tail, f),
                        };
                        for (r, fr) in f.iter().enumerate() {
                            *s.out.add(r * s.stride + j) = hsum(*fr);
                        }
                    }
                }
            }
        };
    }

    /// AVX2: unsigned × signed bytes, four products into each int32 lane (the pairs fit i16
    /// exactly when the unsigned side is at most 127).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn mul_avx2(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        let pairs = _mm256_maddubs_epi16(u, s);
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    #[inline]
    #[target_feature(enable = "avx2,avx512vnni,avx512vl")]
    fn mul_vnni(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, u, s)
    }

    macro_rules! narrow {
        ($name:ident, $features:literal, $mul:ident) => {
            /// `y += W · v` over `n` groups of eight rows. v's four-byte words are broadcast, and
            /// each v byte's sign moved onto the weights, so the product takes |v| unsigned: with
            /// `C` > 0 (then `chunks` == C) once for all groups, held in registers; with C == 0
            /// for each group.
            ///
            /// SAFETY (callers): the CPU has the features named below; `w` holds `n` groups of
            /// `chunks` 32-byte vectors, `d` `n` scales, `y` `n` × 8 floats, `v` `chunks` × 4
            /// bytes.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name<const C: usize>(
                w: *const i8,
                d: *const f32,
                v: *const i8,
                v_scale: f32,
                chunks: usize,
                n: usize,
                y: *mut f32,
            ) {
                // SAFETY: every offset stays within the extents the caller vouches for.
                unsafe {
                    let mut held = [(_mm256_setzero_si256(), _mm256_setzero_si256()); C];
                    for (c, h) in held.iter_mut().enumerate() {
                        let b = _mm256_set1_epi32(v.add(c * LANE).cast::<i32>().read_unaligned());
                        *h = (_mm256_sign_epi8(b, b), b);
                    }
                    for g in 0..n {
                        let row = w.add(g * chunks * 32);
                        let mut acc = _mm256_setzero_si256();
                        if C > 0 {
                            for (c, &(u, b)) in held.iter().enumerate() {
                                let wv = _mm256_loadu_si256(row.add(c * 32).cast());
                                acc = $mul(acc, u, _mm256_sign_epi8(wv, b));
                            }
                        } else {
                            for c in 0..chunks {
                                let b = _mm256_set1_epi32(
                                    v.add(c * LANE).cast::<i32>().read_unaligned(),
                                );
                                let wv = _mm256_loadu_si256(row.add(c * 32).cast());
                                acc = $mul(acc, _mm256_sign_epi8(b, b), _mm256_sign_epi8(wv, b));
                            }
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

    narrow!(narrow_avx2, "avx2,fma", mul_avx2);
    narrow!(narrow_vnni, "avx2,fma,avx512vnni,avx512vl", mul_vnni);

    kernel!(avx2, "avx2,fma", prep_avx2, dot_avx2, bias_none, true);
    kernel!(
        vnni,
        "avx2,fma,avx512vnni,avx512vl",
        prep_signed,
        dot_vnni_biased,
        bias_vnni,
        false
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::ops::test_values as lcg;

    /// Every kernel this CPU runs, the portable reference first.
    fn kernels_here() -> Vec<Kernel> {
        let mut kernels = vec![Kernel::Portable, Kernel::best()];
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        ))]
        kernels.push(Kernel::Avx2);
        kernels.dedup();
        kernels
    }

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
        let kernels = kernels_here();
        for nb in [1usize, 3, 4, 8, 13, 14, 15, 18, 48, 50] {
            let (rows, cols) = (13, nb * BLOCK);
            let w =
                Tensor::from_vec(lcg(rows * cols, nb as u64), (rows, cols), &Device::Cpu).unwrap();
            let q = Q8Matrix::from_tensor(&w).unwrap();
            for m in [1usize, 2, 4, 7, 9, 14, 17] {
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

    /// The AMX-INT8 tile path, for any batch (padded tiles, partial panels, tails, fewer blocks
    /// than a group), from activations quantized for every kernel: the portable kernel's bits.
    #[test]
    fn the_tile_path_gives_the_same_bits_as_the_portable_one() {
        if !qgemm_amx::usable() {
            println!(
                "SKIPPED: this host cannot run AMX-INT8 tiles ({}); the vector kernels are checked by the other tests",
                crate::ops::cpu::features().describe()
            );
            return;
        }
        for nb in [1usize, 3, 8, 18, 48, 50] {
            for rows in [5usize, 16, 37, 48, 64] {
                let cols = nb * BLOCK;
                let q = Q8Matrix::from_f32(&lcg(rows * cols, nb as u64 + rows as u64), rows, cols)
                    .unwrap();
                for m in [1usize, 15, 16, 17, 40, 48, 64] {
                    let x = lcg(m * cols, 7 + m as u64);
                    let want = q
                        .product_on_vectors(&QuantRows::new_for(&x, m, cols, Kernel::Portable))
                        .unwrap();
                    for k in kernels_here() {
                        let got = q
                            .product_on_tiles(&QuantRows::new_for(&x, m, cols, k))
                            .unwrap();
                        assert_eq!(got, want, "{k:?}: {rows} x {nb} blocks, batch {m}");
                        // Batches for the tiles are also quantized straight into their order.
                        let xq = QuantRows::parallel_for(&x, m, cols, k).unwrap();
                        assert_eq!(xq.natural.is_some(), m >= qgemm_amx::MIN_ROWS, "batch {m}");
                        let got = q.product_on_tiles(&xq).unwrap();
                        assert_eq!(got, want, "{k:?}, tiles' order: {rows} x {nb}, batch {m}");
                    }
                }
            }
        }
    }

    /// Activations of another width are an error on every path, tiles included.
    #[test]
    fn a_width_mismatch_is_an_error_for_any_batch() {
        let q = Q8Matrix::from_f32(&lcg(4 * 64, 1), 4, 64).unwrap();
        for m in [1usize, 16, 40] {
            let x = QuantRows::new(&lcg(m * 96, 2), m, 96);
            assert!(q.product(&x).is_err(), "batch {m}");
        }
    }

    /// The narrow product (a LoRA B against a quantized rank vector): every kernel gives the
    /// portable kernel's bits, for ranks that fill and do not fill the four-value lanes, and all
    /// stay within int8 error of the f32 product.
    #[test]
    fn every_narrow_kernel_gives_the_same_bits_and_the_f32_product() {
        let kernels = kernels_here();
        let rows = 48;
        for width in [1usize, 4, 6, 8, 16, 32, 64] {
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

    /// The LoRA shrink: a row of one `QuantRows` against all rows of another gives what a
    /// `Q8Matrix` of the other's rows gives for that row, bit for bit, whichever kernels the two
    /// were quantized for (a biased row is unbiased first).
    #[test]
    fn dots_with_matches_the_matrix_product_for_every_pair_of_kernels() {
        let kernels = kernels_here();
        let (rank, cols, m) = (16, 18 * BLOCK, 3);
        let a = lcg(rank * cols, 21);
        let x = lcg(m * cols, 22);
        let matrix = Q8Matrix::from_f32(&a, rank, cols).unwrap();
        let xt = Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu).unwrap();
        let want: Vec<Vec<f32>> = matrix
            .forward_on(&xt, Kernel::Portable)
            .unwrap()
            .to_vec2()
            .unwrap();
        let mut scratch = Vec::new();
        for &kx in &kernels {
            let rows = QuantRows::new_for(&x, m, cols, kx);
            for &ka in &kernels {
                let factor = QuantRows::new_for(&a, rank, cols, ka);
                for (t, want) in want.iter().enumerate() {
                    let mut out = vec![0f32; rank];
                    rows.dots_with(t, &factor, &mut out, &mut scratch);
                    assert_eq!(&out, want, "row {t}: {kx:?} against {ka:?}");
                }
            }
        }
    }

    /// The vector quantizer gives the scalar one's scale and bytes, including for products
    /// that land exactly on a half (rounded away from zero), at the clamp, and for zero blocks.
    #[test]
    fn block_quantization_is_the_same_with_and_without_vectors() {
        let mut blocks: Vec<Vec<f32>> = (0..200)
            .map(|i| {
                lcg(BLOCK, 500 + i)
                    .iter()
                    .map(|v| v * (i as f32 + 0.5))
                    .collect()
            })
            .collect();
        // amax 127: every value is its own product, so halves round away from zero.
        let mut halves: Vec<f32> = (0..BLOCK).map(|i| i as f32 - 15.5).collect();
        halves[0] = 127.0;
        halves[1] = -0.5;
        halves[2] = 0.5;
        blocks.push(halves);
        blocks.push(vec![0.0; BLOCK]);
        blocks.push(
            (0..BLOCK)
                .map(|i| if i == 7 { -3.0 } else { 0.0 })
                .collect(),
        );
        for (i, b) in blocks.iter().enumerate() {
            let (mut want, mut got) = ([0i8; BLOCK], [0i8; BLOCK]);
            let ds = quantize_block_portable(b, &mut want);
            let dv = quantize_block(b, &mut got);
            assert_eq!((ds.to_bits(), want), (dv.to_bits(), got), "block {i}");
        }
        let mut q = [0i8; BLOCK];
        let mut halves: Vec<f32> = (0..BLOCK).map(|i| i as f32 - 15.5).collect();
        halves[0] = 127.0;
        quantize_block(&halves, &mut q);
        assert_eq!(
            (q[1], q[16], q[17]),
            (-15, 1, 2),
            "-14.5, 0.5 and 1.5 round away from zero"
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
