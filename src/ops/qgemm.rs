//! A batched Q8_0 matrix product for the CPU: `y = x · Wᵀ` with W in blocks of 32 int8 weights
//! sharing one f32 scale. Unlike candle's quantized matmul, which re-reads every weight block for
//! every row of x, this reads each weight block once per call and applies it to all rows, so a
//! decode step over many sequences costs little more weight traffic than one sequence.
//!
//! Activations are quantized to the same blocks per row (as llama.cpp does); the block dot product
//! uses AVX2 where the build targets it, and portable code otherwise.
#![allow(unsafe_code)]

use candle_core::{Device, Result, Tensor};

pub const BLOCK: usize = 32;

/// A row-major Q8_0 matrix: `rows` outputs over `cols` inputs.
pub struct Q8Matrix {
    pub rows: usize,
    pub cols: usize,
    /// rows × (cols / 32)
    scales: Vec<f32>,
    /// rows × cols
    quants: Vec<i8>,
}

/// Quantizes one 32-value block: returns its scale and writes the int8 values.
fn quantize_block(src: &[f32], dst: &mut [i8]) -> f32 {
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

impl Q8Matrix {
    /// Quantizes an f32 (rows, cols) tensor; `cols` must be a multiple of 32.
    pub fn from_tensor(w: &Tensor) -> Result<Self> {
        let (rows, cols) = w.dims2()?;
        if cols % BLOCK != 0 {
            candle_core::bail!("Q8 matrix needs columns in multiples of {BLOCK}, got {cols}");
        }
        let data = w
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let nb = cols / BLOCK;
        let mut scales = vec![0f32; rows * nb];
        let mut quants = vec![0i8; rows * cols];
        for ((s, q), src) in scales
            .chunks_mut(nb)
            .zip(quants.chunks_mut(cols))
            .zip(data.chunks(cols))
        {
            for b in 0..nb {
                s[b] = quantize_block(
                    &src[b * BLOCK..(b + 1) * BLOCK],
                    &mut q[b * BLOCK..(b + 1) * BLOCK],
                );
            }
        }
        Ok(Self {
            rows,
            cols,
            scales,
            quants,
        })
    }

    /// `x` (m, cols) → (m, rows).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (m, cols) = x.dims2()?;
        if cols != self.cols {
            candle_core::bail!(
                "Q8 matmul: input has {cols} columns, matrix has {}",
                self.cols
            );
        }
        let xv = x
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let nb = cols / BLOCK;
        // Quantize the activations: m × nb scales, m × cols int8.
        let mut xs = vec![0f32; m * nb];
        let mut xq = vec![0i8; m * cols];
        for i in 0..m {
            for b in 0..nb {
                let o = i * cols + b * BLOCK;
                xs[i * nb + b] = quantize_block(&xv[o..o + BLOCK], &mut xq[o..o + BLOCK]);
            }
        }
        // Output rows in parallel chunks; each chunk writes (rows_in_chunk × m), row-major by output.
        // Output rows are shared out on candle's own worker pool (a second pool would fight it
        // for the same cores); each row's m outputs are written by exactly one worker.
        let mut yt = vec![0f32; self.rows * m];
        let out = SharedOut(yt.as_mut_ptr());
        let out = &out;
        candle_core::utils::barrier_pool().execute_chunked(self.rows, |range| {
            for row in range {
                let wq = &self.quants[row * cols..(row + 1) * cols];
                let ws = &self.scales[row * nb..(row + 1) * nb];
                // SAFETY: `row < self.rows`, so the m floats at row*m lie inside `yt`, which
                // outlives this call; execute_chunked hands each row to one worker only.
                let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add(row * m), m) };
                dot_rows(wq, ws, &xq, &xs, m, nb, dst);
            }
        });
        let y = if m == 1 {
            yt
        } else {
            let mut y = vec![0f32; m * self.rows];
            for r in 0..self.rows {
                for i in 0..m {
                    y[i * self.rows + r] = yt[r * m + i];
                }
            }
            y
        };
        Tensor::from_vec(y, (m, self.rows), &Device::Cpu)
    }
}

/// The output buffer, shared with the worker pool for disjoint writes.
struct SharedOut(*mut f32);
// SAFETY: workers write disjoint rows (see `forward`), so sharing the pointer races on nothing.
unsafe impl Sync for SharedOut {}

/// One weight row against all m activation rows: `out[i] = Σ_b ws[b]·xs[i,b]·(wq_b · xq_{i,b})`.
/// Rows go in tiles of four with accumulators in registers; a lone row alternates two
/// accumulators so consecutive blocks do not wait on each other.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
fn dot_rows(wq: &[i8], ws: &[f32], xq: &[i8], xs: &[f32], m: usize, nb: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let cols = nb * BLOCK;
    assert!(
        wq.len() >= cols
            && ws.len() >= nb
            && xq.len() >= m * cols
            && xs.len() >= m * nb
            && out.len() >= m
    );

    /// The 8 partial int32 sums of a 32×int8 block dot product, as f32.
    /// SAFETY (callers): AVX2 is enabled for the build.
    #[inline(always)]
    unsafe fn block(aw: __m256i, w: __m256i, x: __m256i) -> __m256 {
        let p16 = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(x, w));
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
    }
    #[inline(always)]
    unsafe fn hsum(a: __m256) -> f32 {
        let s4 = _mm_add_ps(_mm256_extractf128_ps(a, 1), _mm256_castps256_ps128(a));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)))
    }

    // SAFETY: the cfg guarantees AVX2 and FMA; the assertion above guarantees every 32-byte load
    // (at b*32 within a row of `cols` bytes, for rows below m) stays inside its slice.
    unsafe {
        let wp = wq.as_ptr();
        let xp = xq.as_ptr();
        let load = |p: *const i8| _mm256_loadu_si256(p as *const __m256i);
        let mut i = 0;
        while i + 4 <= m {
            // Even and odd blocks accumulate separately, in every path, so a row's result does
            // not depend on the batch it was computed in (and consecutive blocks overlap).
            let z = _mm256_setzero_ps();
            let (mut e0, mut e1, mut e2, mut e3) = (z, z, z, z);
            let (mut f0, mut f1, mut f2, mut f3) = (z, z, z, z);
            let r = [i * cols, (i + 1) * cols, (i + 2) * cols, (i + 3) * cols];
            let sr = [i * nb, (i + 1) * nb, (i + 2) * nb, (i + 3) * nb];
            let mut b = 0;
            while b < nb {
                let o = b * BLOCK;
                let w = load(wp.add(o));
                let aw = _mm256_sign_epi8(w, w);
                let d = ws[b];
                e0 = _mm256_fmadd_ps(
                    block(aw, w, load(xp.add(r[0] + o))),
                    _mm256_set1_ps(d * xs[sr[0] + b]),
                    e0,
                );
                e1 = _mm256_fmadd_ps(
                    block(aw, w, load(xp.add(r[1] + o))),
                    _mm256_set1_ps(d * xs[sr[1] + b]),
                    e1,
                );
                e2 = _mm256_fmadd_ps(
                    block(aw, w, load(xp.add(r[2] + o))),
                    _mm256_set1_ps(d * xs[sr[2] + b]),
                    e2,
                );
                e3 = _mm256_fmadd_ps(
                    block(aw, w, load(xp.add(r[3] + o))),
                    _mm256_set1_ps(d * xs[sr[3] + b]),
                    e3,
                );
                if b + 1 < nb {
                    let o = o + BLOCK;
                    let w = load(wp.add(o));
                    let aw = _mm256_sign_epi8(w, w);
                    let d = ws[b + 1];
                    f0 = _mm256_fmadd_ps(
                        block(aw, w, load(xp.add(r[0] + o))),
                        _mm256_set1_ps(d * xs[sr[0] + b + 1]),
                        f0,
                    );
                    f1 = _mm256_fmadd_ps(
                        block(aw, w, load(xp.add(r[1] + o))),
                        _mm256_set1_ps(d * xs[sr[1] + b + 1]),
                        f1,
                    );
                    f2 = _mm256_fmadd_ps(
                        block(aw, w, load(xp.add(r[2] + o))),
                        _mm256_set1_ps(d * xs[sr[2] + b + 1]),
                        f2,
                    );
                    f3 = _mm256_fmadd_ps(
                        block(aw, w, load(xp.add(r[3] + o))),
                        _mm256_set1_ps(d * xs[sr[3] + b + 1]),
                        f3,
                    );
                }
                b += 2;
            }
            out[i] = hsum(_mm256_add_ps(e0, f0));
            out[i + 1] = hsum(_mm256_add_ps(e1, f1));
            out[i + 2] = hsum(_mm256_add_ps(e2, f2));
            out[i + 3] = hsum(_mm256_add_ps(e3, f3));
            i += 4;
        }
        while i < m {
            let (mut e, mut f) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut b = 0;
            while b + 2 <= nb {
                let w0 = load(wp.add(b * BLOCK));
                let w1 = load(wp.add((b + 1) * BLOCK));
                let x0 = load(xp.add(i * cols + b * BLOCK));
                let x1 = load(xp.add(i * cols + (b + 1) * BLOCK));
                e = _mm256_fmadd_ps(
                    block(_mm256_sign_epi8(w0, w0), w0, x0),
                    _mm256_set1_ps(ws[b] * xs[i * nb + b]),
                    e,
                );
                f = _mm256_fmadd_ps(
                    block(_mm256_sign_epi8(w1, w1), w1, x1),
                    _mm256_set1_ps(ws[b + 1] * xs[i * nb + b + 1]),
                    f,
                );
                b += 2;
            }
            if b < nb {
                let w0 = load(wp.add(b * BLOCK));
                let x0 = load(xp.add(i * cols + b * BLOCK));
                e = _mm256_fmadd_ps(
                    block(_mm256_sign_epi8(w0, w0), w0, x0),
                    _mm256_set1_ps(ws[b] * xs[i * nb + b]),
                    e,
                );
            }
            out[i] = hsum(_mm256_add_ps(e, f));
            i += 1;
        }
    }
}

#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
)))]
fn dot_rows(wq: &[i8], ws: &[f32], xq: &[i8], xs: &[f32], m: usize, nb: usize, out: &mut [f32]) {
    let cols = nb * BLOCK;
    for (i, o) in out.iter_mut().enumerate().take(m) {
        let mut acc = 0f32;
        for b in 0..nb {
            let w = &wq[b * BLOCK..(b + 1) * BLOCK];
            let x = &xq[i * cols + b * BLOCK..i * cols + (b + 1) * BLOCK];
            let dot: i32 = w
                .iter()
                .zip(x)
                .map(|(a, c)| i32::from(*a) * i32::from(*c))
                .sum();
            acc += ws[b] * xs[i * nb + b] * dot as f32;
        }
        *o = acc;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 33) as f32 / (1u64 << 31) as f32 * 2.0 - 1.0
            })
            .collect()
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
