//! Causal grouped-query attention over per-sequence KV caches, for a whole batch in one call: each
//! (query token, kv head) pair is an independent task on candle's worker pool. Replaces a couple
//! of dozen small tensor ops per sequence and layer, which dominated decode steps with many
//! sequences. The cache may hold f32 or f16 (the engine's: half the bytes to stream per step);
//! arithmetic is f32 either way.
#![allow(unsafe_code)]

use half::f16;
use std::sync::Mutex;

/// A KV cache element: widened to f32 eight at a time.
pub trait KvElem: Copy + Send + Sync + 'static {
    fn widen8(x: &[Self; 8]) -> [f32; 8];
    fn widen(self) -> f32;
}

impl KvElem for f32 {
    #[inline]
    fn widen8(x: &[f32; 8]) -> [f32; 8] {
        *x
    }
    #[inline]
    fn widen(self) -> f32 {
        self
    }
}

impl KvElem for f16 {
    #[inline]
    fn widen8(x: &[f16; 8]) -> [f32; 8] {
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "f16c",
            target_feature = "avx"
        ))]
        {
            use std::arch::x86_64::{_mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128};
            let mut out = [0f32; 8];
            // SAFETY: the cfg guarantees F16C and AVX; both pointers cover exactly 8 elements
            // (16 bytes read, 32 bytes written).
            unsafe {
                let h = _mm_loadu_si128(x.as_ptr().cast());
                _mm256_storeu_ps(out.as_mut_ptr(), _mm256_cvtph_ps(h));
            }
            out
        }
        #[cfg(not(all(
            target_arch = "x86_64",
            target_feature = "f16c",
            target_feature = "avx"
        )))]
        {
            x.map(f16::to_f32)
        }
    }
    #[inline]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// One sequence's part of the batch.
pub struct SeqAttention<'a, T: KvElem = f32> {
    /// Keys and values of all its cached positions, token-major: (positions, kv_heads, head_dim).
    pub k: &'a [T],
    pub v: &'a [T],
    /// Its first query row in the batch, and how many query tokens it has (the last ones cached).
    pub row: usize,
    pub tokens: usize,
}

/// `q`: (rows, heads, head_dim), row-major. Writes `out`: (rows, heads, head_dim).
///
/// One task per (query token, kv head): the query heads sharing that kv head read each cached
/// key and value once between them.
pub fn attention<T: KvElem>(
    q: &[f32],
    out: &mut [f32],
    seqs: &[SeqAttention<'_, T>],
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) {
    let group = heads / kv_heads;
    assert!(
        group <= MAX_GROUP,
        "attention: {heads} heads over {kv_heads} kv heads exceeds {MAX_GROUP} per kv head"
    );
    let scale = 1.0 / (head_dim as f32).sqrt();
    // One cell per (row, kv head): the `group` query heads of that kv head, head_dim each.
    let cells: Vec<Mutex<&mut [f32]>> = out.chunks_mut(group * head_dim).map(Mutex::new).collect();
    let mut tasks = Vec::new();
    for (s, seq) in seqs.iter().enumerate() {
        for j in 0..seq.tokens {
            for g in 0..kv_heads {
                tasks.push((s, j, g));
            }
        }
    }
    candle_core::utils::barrier_pool().execute_chunked(tasks.len(), |range| {
        let mut scores = Vec::new();
        // One cached row widened to f32, once for all the heads that read it.
        let mut row_f32 = vec![0f32; head_dim];
        for &(s, j, g) in &tasks[range] {
            let seq = &seqs[s];
            let width = kv_heads * head_dim;
            let total = seq.k.len() / width;
            // Causal: query j of this call sits at position total - tokens + j.
            let visible = total - seq.tokens + j + 1;
            let row = seq.row + j;
            let first = (row * heads + g * group) * head_dim;
            let qs = &q[first..first + group * head_dim];
            scores.clear();
            scores.resize(group * visible, 0f32);
            let at = |p: usize| p * width + g * head_dim;
            for p in 0..visible {
                prefetch(seq.k, at(p + PREFETCH), head_dim);
                widen(&seq.k[at(p)..at(p) + head_dim], &mut row_f32);
                for (h, qh) in qs.chunks_exact(head_dim).enumerate() {
                    scores[h * visible + p] = dot(qh, &row_f32) * scale;
                }
            }
            let Ok(mut o) = cells[row * kv_heads + g].lock() else {
                continue;
            };
            let mut sums = [0f32; MAX_GROUP];
            for (sc, sum) in scores.chunks_exact_mut(visible).zip(sums.iter_mut()) {
                let max = sc.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                for x in sc.iter_mut() {
                    *x = (*x - max).exp();
                    *sum += *x;
                }
            }
            o.fill(0.0);
            // Each cached value row is read once for all the heads that share it.
            for p in 0..visible {
                prefetch(seq.v, at(p + PREFETCH), head_dim);
                widen(&seq.v[at(p)..at(p) + head_dim], &mut row_f32);
                for (h, oh) in o.chunks_exact_mut(head_dim).enumerate() {
                    axpy(oh, scores[h * visible + p], &row_f32);
                }
            }
            for (oh, sum) in o.chunks_exact_mut(head_dim).zip(sums) {
                let inv = 1.0 / sum;
                oh.iter_mut().for_each(|x| *x *= inv);
            }
        }
    });
}

/// Query heads per kv head the op handles (Llama 3 70B has 8; model loading checks the ratio).
pub const MAX_GROUP: usize = 16;

/// Positions ahead of the one being read whose row is requested from memory early: rows of one
/// kv head are strided through the cache, which the hardware prefetchers follow poorly.
const PREFETCH: usize = 4;

/// Asks for `len` elements at `xs[at..]` to be brought into cache (nothing past the end).
#[inline]
fn prefetch<T>(xs: &[T], at: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if at + len <= xs.len() {
            let bytes = len * std::mem::size_of::<T>();
            let base = xs[at..].as_ptr().cast::<i8>();
            for off in (0..bytes).step_by(64) {
                // SAFETY: a prefetch never faults, and `off < bytes` keeps the address inside
                // the slice anyway.
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                        base.add(off),
                    )
                };
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (xs, at, len);
}

/// `dst = src` as f32.
#[inline]
fn widen<T: KvElem>(src: &[T], dst: &mut [f32]) {
    let (sc, sr) = src.as_chunks::<8>();
    let (dc, dr) = dst.as_chunks_mut::<8>();
    for (d, s) in dc.iter_mut().zip(sc) {
        *d = T::widen8(s);
    }
    for (d, s) in dr.iter_mut().zip(sr) {
        *d = s.widen();
    }
}

/// A dot product in eight independent lanes, so the compiler keeps it in one SIMD register (a
/// single running sum must be added in order and stays scalar).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (ac, ar) = a.as_chunks::<8>();
    let (bc, br) = b.as_chunks::<8>();
    let mut acc = [0f32; 8];
    for (x, y) in ac.iter().zip(bc) {
        for l in 0..8 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    let mut sum = (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ar.iter().zip(br) {
        sum += x * y;
    }
    sum
}

/// `o += w · v`.
#[inline]
fn axpy(o: &mut [f32], w: f32, v: &[f32]) {
    for (x, y) in o.iter_mut().zip(v) {
        *x = w.mul_add(*y, *x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_position_returns_its_value_and_causality_holds() {
        // 1 kv head, 2 heads, head_dim 2; a sequence with 2 positions, both queried.
        let k = vec![1., 0., 0., 1.];
        let v = vec![10., 20., 30., 40.];
        let q = vec![5., 0., 0., 5., /* token 2 */ 50., 0., 0., 50.];
        let mut out = vec![0f32; 8];
        attention(
            &q,
            &mut out,
            &[SeqAttention {
                k: &k,
                v: &v,
                row: 0,
                tokens: 2,
            }],
            2,
            1,
            2,
        );
        // Token 1 sees only position 0.
        assert_eq!(&out[..4], &[10., 20., 10., 20.]);
        // Token 2, head 0 prefers position 0 strongly; head 1 position 1.
        assert!((out[4] - 10.).abs() < 1e-3 && (out[6] - 30.).abs() < 1e-3);
    }
}
