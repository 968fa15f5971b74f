//! LoRA factors in 4 bits, for when a batch's adapters are bound by the bytes they stream: eight
//! distinct adapters read their whole factors every decode step, and at 4 bits (plus one f16 scale
//! per 32 values of A and per row of B) a module reads about 55% of its int8 bytes.
//!
//! Each value is stored as an unsigned nibble, q + 8 for q in -8..=7, two to a byte. The products
//! take the nibble as the unsigned operand of the byte multiply as it is, so the only extra work
//! over int8 is unpacking (two masks and a shift per 64 values). The + 8 adds 8 · Σ of the other
//! side's bytes to each dot, which depends only on the activations: it is computed once per input
//! row (`Q4Input`) or rank vector and taken off each lane.
//!
//! - `Q4Rows`, a LoRA A (rank × input), is read against one activation row as `QuantRows` stores
//!   it (interleaved, see `qgemm`): its nibbles follow the same byte positions, a 32-byte vector
//!   holding positions i (low nibbles) and i + 32 (high) of each 64, so every unpacked half lines
//!   up with one 32-byte vector of the activation row. Scales are per row and block of 32.
//! - `Q4Narrow`, a LoRA B (output × rank), is laid out as `Q8Narrow`, eight rows to a group, with
//!   the rank's four-value chunks paired in a byte; one f16 scale per row, as 4 bits leave too
//!   little room for a scale shared by eight rows.
//!
//! The vector and portable paths compute the same exact integer dots and combine them in the same
//! order, so they give the same bits.
#![allow(unsafe_code)]

use half::f16;

use super::qgemm::{hsum8, interleaved_index, QuantRows, QuantVec, BLOCK, GROUP, NARROW_GROUP};

/// Activation bytes one packed 32-byte vector of A covers.
const UNIT: usize = 64;
/// Bytes of one value chunk (one int32 lane).
const LANE: usize = 4;

/// Scales of 4-bit values, stored as f16 relative to the largest (`unit`), so a matrix of tiny
/// values (a LoRA B early in training) keeps f16's full precision.
struct Scales {
    unit: f32,
    rel: Vec<f16>,
}

/// Steps `best_step` tries, from absmax / 7 down to 0.7 of it.
const STEPS: usize = 5;

/// Eight lanes of running maxima of |x|.
#[inline(always)]
fn lane_max(top: &mut [f32; 8], x: &[f32; 8]) {
    for (m, v) in top.iter_mut().zip(x) {
        *m = m.max(v.abs());
    }
}

/// Adds the squared error of rounding `x` on each candidate step to that step's lanes.
#[inline(always)]
fn lane_errors(
    error: &mut [[f32; 8]; STEPS],
    x: &[f32; 8],
    steps: &[f32; STEPS],
    inverse: &[f32; STEPS],
) {
    for ((lanes, &d), &inv) in error.iter_mut().zip(steps).zip(inverse) {
        for (l, &v) in lanes.iter_mut().zip(x) {
            let e = v - (v * inv).round_ties_even().clamp(-8.0, 7.0) * d;
            *l += e * e;
        }
    }
}

/// The step for `values` in 4 bits that leaves the least squared error (see `Scales::new`). One
/// pass scores every candidate step, eight values at a time (a short tail is padded with zeros,
/// which round to zero under any step), so the loops stay in vectors.
fn best_step(values: &[f32]) -> f32 {
    let whole = values.len() / 8 * 8;
    let mut tail = [0f32; 8];
    tail[..values.len() - whole].copy_from_slice(&values[whole..]);
    let body = values[..whole]
        .chunks_exact(8)
        .filter_map(|c| <&[f32; 8]>::try_from(c).ok());
    let mut top = [0f32; 8];
    for x in body.clone() {
        lane_max(&mut top, x);
    }
    let ragged = whole < values.len();
    if ragged {
        lane_max(&mut top, &tail);
    }
    let amax = top.iter().fold(0f32, |m, &v| m.max(v));
    if amax == 0.0 || !amax.is_finite() {
        return 0.0;
    }
    let steps: [f32; STEPS] = std::array::from_fn(|i| amax / 7.0 * (1.0 - 0.075 * i as f32));
    let inverse = steps.map(|d| 1.0 / d);
    let mut error = [[0f32; 8]; STEPS];
    for x in body {
        lane_errors(&mut error, x, &steps, &inverse);
    }
    if ragged {
        lane_errors(&mut error, &tail, &steps, &inverse);
    }
    let mut best = (f32::MAX, steps[0]);
    for (lanes, &d) in error.iter().zip(&steps) {
        let e: f32 = lanes.iter().sum();
        if e < best.0 {
            best = (e, d);
        }
    }
    best.1
}

impl Scales {
    /// One scale per `per` values of `src`: of five steps from absmax / 7 down to 0.7 of it,
    /// the one that leaves the least squared error (a little clipping of the largest value buys a
    /// finer step for all the others).
    fn new(src: &[f32], per: usize) -> Self {
        let d: Vec<f32> = src.chunks(per).map(best_step).collect();
        let top = d.iter().fold(0f32, |m, &v| m.max(v));
        let unit = if top > 0.0 && top.is_finite() {
            top
        } else {
            1.0
        };
        Self {
            unit,
            rel: d.iter().map(|&v| f16::from_f32(v / unit)).collect(),
        }
    }

    /// Nibbles q + 8 (q in -8..=7) of `src` against stored scale i, as the kernels will read it.
    fn quantize(&self, i: usize, src: &[f32], dst: &mut [u8]) {
        let d = self.rel[i].to_f32() * self.unit;
        if !(d > 0.0 && d.is_finite()) {
            dst.fill(8);
            return;
        }
        let inv = 1.0 / d;
        for (q, &v) in dst.iter_mut().zip(src) {
            // A NaN level (zero times an infinite inverse of a subnormal step) casts to 0.
            let level = (v * inv).round_ties_even().clamp(-8.0, 7.0);
            *q = (level as i32 + 8) as u8;
        }
    }
}

/// A (rank × input) in 4 bits, for `Q4Input` rows of the same width.
pub struct Q4Rows {
    rows: usize,
    cols: usize,
    /// rows × cols / 2: per row, cols / 64 vectors of 32 bytes (see the module comment).
    packed: Vec<u8>,
    /// rows × cols / 32, row-major, relative to `unit`.
    scales: Vec<f16>,
    unit: f32,
}

impl Q4Rows {
    /// `a`: `rows` × `cols` values, row-major. `None` unless cols is a multiple of 64.
    pub fn quantize(a: &[f32], rows: usize, cols: usize) -> Option<Self> {
        if rows == 0 || cols == 0 || !cols.is_multiple_of(UNIT) || a.len() != rows * cols {
            return None;
        }
        let nb = cols / BLOCK;
        let mut packed = vec![0u8; rows * cols / 2];
        let scales = Scales::new(a, BLOCK);
        let mut nibbles = [0u8; BLOCK];
        // One row's nibbles at the byte positions where the activation row keeps their inputs.
        let mut placed = vec![0u8; cols];
        for (j, src) in a.chunks_exact(cols).enumerate() {
            for b in 0..nb {
                scales.quantize(j * nb + b, &src[b * BLOCK..(b + 1) * BLOCK], &mut nibbles);
                for (c, four) in nibbles.chunks_exact(LANE).enumerate() {
                    let at = interleaved_index(b, c * LANE, nb);
                    placed[at..at + LANE].copy_from_slice(four);
                }
            }
            // Positions i and i + 32 of each 64 share byte i of that unit's 32.
            let row = &mut packed[j * cols / 2..(j + 1) * cols / 2];
            for (dst, unit) in row
                .chunks_exact_mut(UNIT / 2)
                .zip(placed.chunks_exact(UNIT))
            {
                let (low, high) = unit.split_at(UNIT / 2);
                for ((d, &l), &h) in dst.iter_mut().zip(low).zip(high) {
                    *d = l | (h << 4);
                }
            }
        }
        Some(Self {
            rows,
            cols,
            packed,
            scales: scales.rel,
            unit: scales.unit,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn bytes(&self) -> usize {
        self.packed.len() + self.scales.len() * std::mem::size_of::<f16>()
    }

    /// Row j's value at input k, as stored (for tests and the reference).
    pub fn value(&self, j: usize, k: usize) -> f32 {
        let nb = self.cols / BLOCK;
        let (b, e) = (k / BLOCK, k % BLOCK);
        let p = interleaved_index(b, e, nb);
        let byte = self.packed[j * self.cols / 2 + p / UNIT * UNIT / 2 + p % (UNIT / 2)];
        let q = if p % UNIT < UNIT / 2 {
            byte & 15
        } else {
            byte >> 4
        };
        (i32::from(q) - 8) as f32 * self.scales[j * nb + b].to_f32() * self.unit
    }

    /// `out[j] = Σ_k x[k] · A[j, k]` for every row j, against one prepared activation row.
    pub fn dots(&self, x: &Q4Input<'_>, out: &mut [f32]) {
        if x.quants.len() != self.cols || out.len() < self.rows {
            return;
        }
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma",
            target_feature = "f16c"
        ))]
        // SAFETY: the cfg guarantees the kernel's features; the widths were checked above.
        unsafe {
            x86::rows_avx2(self, x, out)
        };
        #[cfg(not(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma",
            target_feature = "f16c"
        )))]
        self.dots_portable(x, out);
    }

    /// The reference for `dots`: the same exact integer dots, combined in the same order.
    pub fn dots_portable(&self, x: &Q4Input<'_>, out: &mut [f32]) {
        let (cols, nb) = (self.cols, self.cols / BLOCK);
        if x.quants.len() != cols || out.len() < self.rows {
            return;
        }
        let whole = nb / GROUP * GROUP;
        for (j, o) in out.iter_mut().enumerate().take(self.rows) {
            let row = &self.packed[j * cols / 2..(j + 1) * cols / 2];
            let nibble = |p: usize| {
                let byte = row[p / UNIT * UNIT / 2 + p % (UNIT / 2)];
                let q = if p % UNIT < UNIT / 2 {
                    byte & 15
                } else {
                    byte >> 4
                };
                i32::from(q) - 8
            };
            let dot = |from: usize, len: usize| -> i32 {
                (from..from + len)
                    .map(|p| nibble(p) * i32::from(x.quants[p]))
                    .sum()
            };
            let scale = |b: usize| self.scales[j * nb + b].to_f32() * x.scales[b];
            let mut lanes = [0f32; GROUP];
            for g in 0..whole / GROUP {
                // Lane l holds block g · 8 + l: four bytes of it in each of the group's vectors.
                for (l, lane) in lanes.iter_mut().enumerate() {
                    let b = g * GROUP + l;
                    let d: i32 = (0..BLOCK / LANE)
                        .map(|c| dot(g * GROUP * BLOCK + c * GROUP * LANE + l * LANE, LANE))
                        .sum();
                    *lane = (d as f32).mul_add(scale(b), *lane);
                }
            }
            for b in whole..nb {
                for (l, lane) in lanes.iter_mut().enumerate() {
                    let d = dot(b * BLOCK + l * LANE, LANE);
                    *lane = (d as f32).mul_add(scale(b), *lane);
                }
            }
            *o = hsum8(lanes) * self.unit;
        }
    }
}

/// One activation row prepared for `Q4Rows::dots`: its bytes signed, its block scales, and what
/// the nibbles' + 8 adds to each int32 lane (8 · the lane's four bytes, summed as the kernel
/// sums lanes: over a whole group's eight vectors, or per tail block).
pub struct Q4Input<'a> {
    /// Borrowed where the row is stored signed already (all but the VNNI layout).
    quants: std::borrow::Cow<'a, [i8]>,
    scales: &'a [f32],
    bias: Vec<[i32; GROUP]>,
}

impl<'a> Q4Input<'a> {
    /// Row `t` of `x`.
    pub fn new(x: &'a QuantRows, t: usize) -> Self {
        let (row, scales, flip) = x.row(t);
        let quants: std::borrow::Cow<'a, [i8]> = if flip == 0 {
            row.into()
        } else {
            row.iter().map(|&q| q ^ flip).collect::<Vec<i8>>().into()
        };
        let nb = scales.len();
        let whole = nb / GROUP * GROUP;
        let lanes = |v: &[i8]| -> [i32; GROUP] {
            std::array::from_fn(|l| {
                v[l * LANE..(l + 1) * LANE]
                    .iter()
                    .map(|&q| 8 * i32::from(q))
                    .sum()
            })
        };
        let mut bias = Vec::with_capacity(whole / GROUP + nb - whole);
        for g in 0..whole / GROUP {
            let mut sum = [0i32; GROUP];
            for v in quants[g * GROUP * BLOCK..(g + 1) * GROUP * BLOCK].chunks_exact(BLOCK) {
                sum.iter_mut().zip(lanes(v)).for_each(|(s, l)| *s += l);
            }
            bias.push(sum);
        }
        for b in whole..nb {
            bias.push(lanes(&quants[b * BLOCK..(b + 1) * BLOCK]));
        }
        Self {
            quants,
            scales,
            bias,
        }
    }
}

/// B (output × rank) in 4 bits: `rows` outputs in groups of eight over `width` values (padded
/// to a multiple of 8), for `y += W · v` with v a `QuantVec`.
pub struct Q4Narrow {
    rows: usize,
    width: usize,
    /// [group][width / 8][8 rows][4 bytes]: byte (r, k) of pair p holds value 8p + k (low
    /// nibble) and 8p + 4 + k (high) of row r.
    packed: Vec<u8>,
    /// One per row, relative to `unit`.
    scales: Vec<f16>,
    unit: f32,
}

impl Q4Narrow {
    /// `w`: `rows` × `width` values, row-major. `None` unless rows is a multiple of 8.
    pub fn quantize(w: &[f32], rows: usize, width: usize) -> Option<Self> {
        if w.len() != rows * width || width == 0 || rows == 0 || !rows.is_multiple_of(NARROW_GROUP)
        {
            return None;
        }
        let padded = width.next_multiple_of(2 * LANE);
        let pairs = padded / (2 * LANE);
        let mut packed = vec![0u8; rows * padded / 2];
        let scales = Scales::new(w, width);
        let mut q = vec![8u8; padded];
        for (r, src) in w.chunks_exact(width).enumerate() {
            scales.quantize(r, src, &mut q[..width]);
            let (g, lane) = (r / NARROW_GROUP, r % NARROW_GROUP);
            for p in 0..pairs {
                for k in 0..LANE {
                    let at = ((g * pairs + p) * NARROW_GROUP + lane) * LANE + k;
                    packed[at] = q[8 * p + k] | (q[8 * p + LANE + k] << 4);
                }
            }
        }
        Some(Self {
            rows,
            width: padded,
            packed,
            scales: scales.rel,
            unit: scales.unit,
        })
    }

    /// The width rank vectors are padded to.
    pub fn width(&self) -> usize {
        self.width
    }

    pub fn bytes(&self) -> usize {
        self.packed.len() + self.scales.len() * std::mem::size_of::<f16>()
    }

    /// Row r's value at k, as stored (for tests and the reference).
    pub fn value(&self, r: usize, k: usize) -> f32 {
        let pairs = self.width / (2 * LANE);
        let (g, lane, p) = (r / NARROW_GROUP, r % NARROW_GROUP, k / (2 * LANE));
        let at = ((g * pairs + p) * NARROW_GROUP + lane) * LANE + k % LANE;
        let byte = self.packed[at];
        let q = if k % (2 * LANE) < LANE {
            byte & 15
        } else {
            byte >> 4
        };
        (i32::from(q) - 8) as f32 * self.scales[r].to_f32() * self.unit
    }

    /// `y[i] += (W · v)[i]` for every row.
    pub fn add_product(&self, v: &QuantVec, y: &mut [f32]) {
        let (q, _) = v.parts();
        if q.len() != self.width || y.len() != self.rows {
            return;
        }
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma",
            target_feature = "f16c"
        ))]
        // SAFETY: the cfg guarantees the kernel's features; the widths were checked above.
        unsafe {
            x86::narrow_avx2(self, v, y)
        };
        #[cfg(not(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma",
            target_feature = "f16c"
        )))]
        self.add_product_portable(v, y);
    }

    /// The reference for `add_product`, with the same bits.
    pub fn add_product_portable(&self, v: &QuantVec, y: &mut [f32]) {
        let (q, v_scale) = v.parts();
        if q.len() != self.width || y.len() != self.rows {
            return;
        }
        let pairs = self.width / (2 * LANE);
        let v_scale = v_scale * self.unit;
        for (r, yr) in y.iter_mut().enumerate() {
            let (g, lane) = (r / NARROW_GROUP, r % NARROW_GROUP);
            let mut acc = 0i32;
            for p in 0..pairs {
                for k in 0..LANE {
                    let byte = self.packed[((g * pairs + p) * NARROW_GROUP + lane) * LANE + k];
                    acc += (i32::from(byte & 15) - 8) * i32::from(q[8 * p + k]);
                    acc += (i32::from(byte >> 4) - 8) * i32::from(q[8 * p + LANE + k]);
                }
            }
            *yr += acc as f32 * (self.scales[r].to_f32() * v_scale);
        }
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
mod x86 {
    use super::{Q4Input, Q4Narrow, Q4Rows, BLOCK, GROUP, LANE, NARROW_GROUP, UNIT};
    use crate::ops::qgemm::x86::hsum;
    use std::arch::x86_64::*;

    /// The low and high nibbles of 32 bytes, each as 32 unsigned bytes.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn unpack(v: __m256i) -> (__m256i, __m256i) {
        let mask = _mm256_set1_epi8(15);
        (
            _mm256_and_si256(v, mask),
            _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask),
        )
    }

    /// Two unsigned-by-signed byte products, four of each into each int32 lane. The pairs of
    /// one product fit i16 (15 · 128 · 2), and so does the sum of two.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn mul2(acc: __m256i, u0: __m256i, s0: __m256i, u1: __m256i, s1: __m256i) -> __m256i {
        let pairs = _mm256_add_epi16(_mm256_maddubs_epi16(u0, s0), _mm256_maddubs_epi16(u1, s1));
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    /// `Q4Rows::dots`. SAFETY (callers): the CPU has AVX2, FMA and F16C; `x` is as wide as `a`
    /// and `out` holds at least `a.rows` values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rows_avx2(a: &Q4Rows, x: &Q4Input<'_>, out: &mut [f32]) {
        let (cols, nb) = (a.cols, a.cols / BLOCK);
        let whole = nb / GROUP * GROUP;
        let xq = x.quants.as_ptr();
        // SAFETY: every offset stays inside the rows' `cols / 2` packed bytes and `nb` scales,
        // the activation's `cols` bytes and `nb` scales, and its `whole / 8 + nb - whole` bias
        // entries.
        unsafe {
            let load = |p: *const u8| _mm256_loadu_si256(p.cast());
            let xv = |o: usize| _mm256_loadu_si256(xq.add(o).cast());
            for (j, o) in out.iter_mut().enumerate().take(a.rows) {
                let row = a.packed.as_ptr().add(j * cols / 2);
                let ws = a.scales.as_ptr().add(j * nb);
                let mut f = _mm256_setzero_ps();
                for g in 0..whole / GROUP {
                    let base = g * GROUP * BLOCK;
                    let mut acc = _mm256_setzero_si256();
                    for u in 0..GROUP * BLOCK / UNIT {
                        let (lo, hi) = unpack(load(row.add((base + u * UNIT) / 2)));
                        let at = base + u * UNIT;
                        acc = mul2(acc, lo, xv(at), hi, xv(at + UNIT / 2));
                    }
                    let bias = _mm256_loadu_si256(x.bias.as_ptr().add(g).cast());
                    let wsv = _mm256_cvtph_ps(_mm_loadu_si128(ws.add(g * GROUP).cast()));
                    let sc = _mm256_mul_ps(wsv, _mm256_loadu_ps(x.scales.as_ptr().add(g * GROUP)));
                    let d = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc, bias));
                    f = _mm256_fmadd_ps(d, sc, f);
                }
                // Tail blocks in pairs: one packed vector holds both.
                for b in (whole..nb).step_by(2) {
                    let (lo, hi) = unpack(load(row.add(b * BLOCK / 2)));
                    for (half, h) in [lo, hi].into_iter().enumerate() {
                        let blk = b + half;
                        let zero = _mm256_setzero_si256();
                        let acc = mul2(zero, h, xv(blk * BLOCK), zero, zero);
                        let bias = _mm256_loadu_si256(
                            x.bias.as_ptr().add(whole / GROUP + blk - whole).cast(),
                        );
                        let sc = (*ws.add(blk)).to_f32() * x.scales[blk];
                        let d = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc, bias));
                        f = _mm256_fmadd_ps(d, _mm256_set1_ps(sc), f);
                    }
                }
                *o = hsum(f) * a.unit;
            }
        }
    }

    /// `Q4Narrow::add_product`. SAFETY (callers): the CPU has AVX2, FMA and F16C; v is `w.width`
    /// bytes and y `w.rows` floats.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn narrow_avx2(w: &Q4Narrow, v: &super::QuantVec, y: &mut [f32]) {
        let (q, v_scale) = v.parts();
        let pairs = w.width / (2 * LANE);
        // What the nibbles' + 8 adds to every row's dot.
        let bias = _mm256_set1_epi32(8 * q.iter().map(|&b| i32::from(b)).sum::<i32>());
        let word = |c: usize| {
            let mut four = [0u8; LANE];
            four.iter_mut()
                .zip(&q[c * LANE..(c + 1) * LANE])
                .for_each(|(d, &s)| *d = s as u8);
            _mm256_set1_epi32(i32::from_le_bytes(four))
        };
        let vs = _mm256_set1_ps(v_scale * w.unit);
        // SAFETY: every offset stays inside the rows / 8 groups of `pairs` 32-byte vectors,
        // the rows' scales and `y`'s rows.
        unsafe {
            match pairs {
                2 => {
                    let held = [word(0), word(1), word(2), word(3)];
                    for g in 0..w.rows / NARROW_GROUP {
                        let p = w.packed.as_ptr().add(g * 2 * 32);
                        let (l0, h0) = unpack(_mm256_loadu_si256(p.cast()));
                        let (l1, h1) = unpack(_mm256_loadu_si256(p.add(32).cast()));
                        let acc = mul2(_mm256_setzero_si256(), l0, held[0], h0, held[1]);
                        let acc = mul2(acc, l1, held[2], h1, held[3]);
                        finish(w, g, acc, bias, vs, y);
                    }
                }
                _ => {
                    for g in 0..w.rows / NARROW_GROUP {
                        let mut acc = _mm256_setzero_si256();
                        for pr in 0..pairs {
                            let p = w.packed.as_ptr().add((g * pairs + pr) * 32);
                            let (lo, hi) = unpack(_mm256_loadu_si256(p.cast()));
                            acc = mul2(acc, lo, word(2 * pr), hi, word(2 * pr + 1));
                        }
                        finish(w, g, acc, bias, vs, y);
                    }
                }
            }
        }
    }

    /// Group g's eight dots, unbiased and scaled, added to their outputs.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn finish(
        w: &Q4Narrow,
        g: usize,
        acc: __m256i,
        bias: __m256i,
        vs: __m256,
        y: &mut [f32],
    ) {
        // SAFETY: g < rows / 8, so eight scales and eight outputs from g · 8 exist.
        unsafe {
            let s = _mm256_cvtph_ps(_mm_loadu_si128(
                w.scales.as_ptr().add(g * NARROW_GROUP).cast(),
            ));
            let sc = _mm256_mul_ps(s, vs);
            let yo = y.as_mut_ptr().add(g * NARROW_GROUP);
            let add = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc, bias)), sc);
            _mm256_storeu_ps(yo, _mm256_add_ps(_mm256_loadu_ps(yo), add));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
            })
            .collect()
    }

    /// |got - want| within `tol` of the largest |want|.
    fn close(got: &[f32], want: &[f32], tol: f32) {
        let top = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol * top,
                "{i}: {g} against {w} (largest {top})"
            );
        }
    }

    /// Squared error of rounding `block` to 4 bits on absmax / 7 steps, the plain choice.
    fn plain_error(block: &[f32]) -> f32 {
        let d = block.iter().fold(0f32, |m, v| m.max(v.abs())) / 7.0;
        block
            .iter()
            .map(|&v| (v - (v / d).round() * d).powi(2))
            .sum()
    }

    /// Each block's stored values leave no more squared error than plain absmax rounding (a
    /// searched step may clip the largest value a little, never by more than 0.3 of it), also
    /// for values far below f16's normal range.
    #[test]
    fn stored_values_err_no_more_than_plain_rounding() {
        let check = |block: &[f32], got: &[f32], what: &str| {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err: f32 = block.iter().zip(got).map(|(v, g)| (v - g).powi(2)).sum();
            assert!(
                err <= plain_error(block) * 1.01,
                "{what}: {err} against {}",
                plain_error(block)
            );
            for (v, g) in block.iter().zip(got) {
                assert!((v - g).abs() <= 0.31 * amax, "{what}: {g} for {v}");
            }
        };
        let (rows, cols) = (16, 576);
        let a = values(rows * cols, 1, 0.05);
        let q = Q4Rows::quantize(&a, rows, cols).unwrap();
        for j in 0..rows {
            for b in 0..cols / BLOCK {
                let block = &a[j * cols + b * BLOCK..][..BLOCK];
                let got: Vec<f32> = (0..BLOCK).map(|e| q.value(j, b * BLOCK + e)).collect();
                check(block, &got, &format!("A row {j} block {b}"));
            }
        }
        let w = values(64 * 16, 2, 1e-6);
        let n = Q4Narrow::quantize(&w, 64, 16).unwrap();
        for r in 0..64 {
            let got: Vec<f32> = (0..16).map(|k| n.value(r, k)).collect();
            check(&w[r * 16..(r + 1) * 16], &got, &format!("tiny B row {r}"));
        }
    }

    #[test]
    fn a_rows_dots_match_the_stored_values_and_the_reference_bit_for_bit() {
        // 576: two whole groups and a pair of tail blocks; 1536: whole groups only; 64: tails.
        for (cols, seed) in [(576, 3), (1536, 4), (64, 5)] {
            let rank = 16;
            let a = values(rank * cols, seed, 0.03);
            let q = Q4Rows::quantize(&a, rank, cols).unwrap();
            let x = values(3 * cols, seed + 10, 2.0);
            let xq = QuantRows::new(&x, 3, cols);
            for t in 0..3 {
                let input = Q4Input::new(&xq, t);
                let mut got = vec![0f32; rank];
                let mut reference = vec![0f32; rank];
                q.dots(&input, &mut got);
                q.dots_portable(&input, &mut reference);
                assert_eq!(got, reference, "{cols} columns, row {t}");
                let want: Vec<f32> = (0..rank)
                    .map(|j| (0..cols).map(|k| x[t * cols + k] * q.value(j, k)).sum())
                    .collect();
                // The activation's own int8 rounding is all that separates them.
                close(&got, &want, 0.02);
            }
        }
    }

    #[test]
    fn widths_a_cannot_pair_are_refused() {
        assert!(Q4Rows::quantize(&[0.0; 16 * 96], 16, 96).is_none());
        assert!(Q4Narrow::quantize(&[0.0; 12 * 16], 12, 16).is_none());
    }

    #[test]
    fn b_products_match_the_stored_values_and_the_reference_bit_for_bit() {
        for (rank, seed) in [(4, 6), (8, 7), (16, 8), (32, 9), (12, 10)] {
            let rows = 576;
            let w = values(rows * rank, seed, 0.02);
            let q = Q4Narrow::quantize(&w, rows, rank).unwrap();
            let v = values(rank, seed + 10, 3.0);
            let qv = QuantVec::new(&v, q.width());
            let start = values(rows, seed + 20, 1.0);
            let (mut got, mut reference) = (start.clone(), start.clone());
            q.add_product(&qv, &mut got);
            q.add_product_portable(&qv, &mut reference);
            assert_eq!(got, reference, "rank {rank}");
            let want: Vec<f32> = (0..rows)
                .map(|r| start[r] + (0..rank).map(|k| v[k] * q.value(r, k)).sum::<f32>())
                .collect();
            let delta: Vec<f32> = got.iter().zip(&start).map(|(g, s)| g - s).collect();
            let want_delta: Vec<f32> = want.iter().zip(&start).map(|(w, s)| w - s).collect();
            close(&delta, &want_delta, 0.02);
        }
    }
}
