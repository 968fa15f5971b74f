//! Causal grouped-query attention over per-sequence KV caches, for a whole batch in one call: each
//! (query token, kv head) pair is an independent task on candle's worker pool. Replaces a couple
//! of dozen small tensor ops per sequence and layer, which dominated decode steps with many
//! sequences. The cache may hold f32 or f16 (the engine's: half the bytes to stream per step);
//! arithmetic is f32 either way.
#![allow(unsafe_code)]

use super::exp_nonpositive;
use half::f16;
use std::sync::Mutex;

/// A KV cache element: widened to f32 eight at a time.
pub trait KvElem: Copy + Send + Sync + 'static {
    fn widen8(x: &[Self; 8]) -> [f32; 8];
    fn widen(self) -> f32;
    /// The cache as f16, when it is (the vector path reads f16 caches directly).
    fn as_f16(xs: &[Self]) -> Option<&[f16]> {
        let _ = xs;
        None
    }
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
    fn as_f16(xs: &[f16]) -> Option<&[f16]> {
        Some(xs)
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
    attention_on(q, out, seqs, heads, kv_heads, head_dim, vector::usable());
}

/// `attention`, with the vector path for f16 caches allowed or not (tests compare the two).
fn attention_on<T: KvElem>(
    q: &[f32],
    out: &mut [f32],
    seqs: &[SeqAttention<'_, T>],
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vectors: bool,
) {
    let group = heads / kv_heads;
    // The vector path: f16 caches, heads a multiple of 32 wide, at most 4 query heads per kv
    // head (every Llama 3 and SmolLM2 size).
    let vectors = vectors && head_dim.is_multiple_of(32) && (1..=4).contains(&group);
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
            let f16s = T::as_f16(seq.k).zip(T::as_f16(seq.v)).filter(|_| vectors);
            if let Some((k, _)) = f16s {
                vector::scores(
                    qs,
                    &k[at(0)..],
                    width,
                    head_dim,
                    visible,
                    scale,
                    &mut scores,
                );
            } else {
                for p in 0..visible {
                    prefetch(seq.k, at(p + PREFETCH), head_dim);
                    widen(&seq.k[at(p)..at(p) + head_dim], &mut row_f32);
                    for (h, qh) in qs.chunks_exact(head_dim).enumerate() {
                        scores[h * visible + p] = dot(qh, &row_f32) * scale;
                    }
                }
            }
            let Ok(mut o) = cells[row * kv_heads + g].lock() else {
                continue;
            };
            let mut sums = [0f32; MAX_GROUP];
            for (sc, sum) in scores.chunks_exact_mut(visible).zip(sums.iter_mut()) {
                let max = sc.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                // Two loops, so the compiler vectorizes the exponentials (libm's are scalar calls).
                for x in sc.iter_mut() {
                    *x = exp_nonpositive(*x - max);
                }
                *sum = sum_lanes(sc);
            }
            // Each cached value row is read once for all the heads that share it.
            if let Some((_, v)) = f16s {
                vector::values(&scores, &v[at(0)..], width, head_dim, visible, &mut o);
            } else {
                o.fill(0.0);
                for p in 0..visible {
                    prefetch(seq.v, at(p + PREFETCH), head_dim);
                    widen(&seq.v[at(p)..at(p) + head_dim], &mut row_f32);
                    for (h, oh) in o.chunks_exact_mut(head_dim).enumerate() {
                        axpy(oh, scores[h * visible + p], &row_f32);
                    }
                }
            }
            for (oh, sum) in o.chunks_exact_mut(head_dim).zip(sums) {
                let inv = 1.0 / sum;
                oh.iter_mut().for_each(|x| *x *= inv);
            }
        }
    });
}

/// The attention inner loops on f16 caches with AVX2/FMA/F16C: each cached row is converted in
/// registers (no f32 copy), and the value loop keeps every head's output in registers across
/// all positions, 32 dimensions at a time.
mod vector {
    use half::f16;

    /// Whether this CPU runs the vector path.
    pub(super) fn usable() -> bool {
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        ))]
        {
            // AVX2 and FMA are compile-time features here; F16C is checked.
            std::arch::is_x86_feature_detected!("f16c")
        }
        #[cfg(not(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        )))]
        false
    }

    /// The shapes the kernels take: `group` heads (1 to 4) of `dim` (a multiple of 32) in
    /// `heads_len` values, and `visible` cached rows of `dim`, `stride` apart, on a CPU that
    /// runs them.
    fn fits(
        dim: usize,
        group: usize,
        heads_len: usize,
        cache: &[f16],
        stride: usize,
        visible: usize,
    ) -> bool {
        dim > 0
            && dim.is_multiple_of(32)
            && (1..=4).contains(&group)
            && heads_len == group * dim
            && visible > 0
            && cache.len() >= (visible - 1) * stride + dim
            && usable()
    }

    /// `scores[h · visible + p] = scale · q_h · k_p`: `q` holds the group's heads (a multiple
    /// of 32 wide, at most 4 of them), `k` the kv head's row for position 0, then one every
    /// `stride` elements.
    pub(super) fn scores(
        q: &[f32],
        k: &[f16],
        stride: usize,
        dim: usize,
        visible: usize,
        scale: f32,
        scores: &mut [f32],
    ) {
        let group = q.len() / dim.max(1);
        assert!(fits(dim, group, q.len(), k, stride, visible) && scores.len() >= group * visible);
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        ))]
        // SAFETY: the assertion bounds every access (rows p < visible of `dim` elements at
        // p · stride, `group` heads of q, group · visible scores) and checks the CPU features.
        unsafe {
            let (q, k, s) = (q.as_ptr(), k.as_ptr(), scores.as_mut_ptr());
            match group {
                1 => x86::scores::<1>(q, k, stride, dim, visible, scale, s),
                2 => x86::scores::<2>(q, k, stride, dim, visible, scale, s),
                3 => x86::scores::<3>(q, k, stride, dim, visible, scale, s),
                _ => x86::scores::<4>(q, k, stride, dim, visible, scale, s),
            }
        }
    }

    /// `o_h = Σ_p w[h · visible + p] · v_p` for the group's heads (`o`: group × dim).
    pub(super) fn values(
        w: &[f32],
        v: &[f16],
        stride: usize,
        dim: usize,
        visible: usize,
        o: &mut [f32],
    ) {
        let group = o.len() / dim.max(1);
        assert!(fits(dim, group, o.len(), v, stride, visible) && w.len() >= group * visible);
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        ))]
        // SAFETY: as in `scores`.
        unsafe {
            let (w, v, o) = (w.as_ptr(), v.as_ptr(), o.as_mut_ptr());
            match group {
                1 => x86::values::<1>(w, v, stride, dim, visible, o),
                2 => x86::values::<2>(w, v, stride, dim, visible, o),
                3 => x86::values::<3>(w, v, stride, dim, visible, o),
                _ => x86::values::<4>(w, v, stride, dim, visible, o),
            }
        }
    }

    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    mod x86 {
        use super::super::PREFETCH;
        use crate::ops::qgemm::x86::hsum;
        use half::f16;
        use std::arch::x86_64::*;

        /// Eight f16 at `p` as f32.
        #[inline]
        #[target_feature(enable = "avx2,f16c")]
        unsafe fn load8(p: *const f16) -> __m256 {
            // SAFETY (callers): p has 8 readable f16.
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
        }

        /// SAFETY (callers): as `super::scores` asserts, with G heads.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) unsafe fn scores<const G: usize>(
            q: *const f32,
            k: *const f16,
            stride: usize,
            dim: usize,
            visible: usize,
            scale: f32,
            out: *mut f32,
        ) {
            // SAFETY: offsets stay below (visible - 1) · stride + dim in k, G · dim in q and
            // G · visible in out; prefetches never fault.
            unsafe {
                for p in 0..visible {
                    let row = k.add(p * stride);
                    if p + PREFETCH < visible {
                        let ahead = k.add((p + PREFETCH) * stride).cast::<i8>();
                        for off in (0..dim * 2).step_by(64) {
                            _mm_prefetch::<_MM_HINT_T0>(ahead.add(off));
                        }
                    }
                    let mut acc = [[_mm256_setzero_ps(); 2]; G];
                    for c in (0..dim).step_by(32) {
                        let kr: [__m256; 4] = std::array::from_fn(|i| load8(row.add(c + 8 * i)));
                        for (h, a) in acc.iter_mut().enumerate() {
                            let qh = q.add(h * dim + c);
                            for (i, kv) in kr.iter().enumerate() {
                                let qv = _mm256_loadu_ps(qh.add(8 * i));
                                a[i % 2] = _mm256_fmadd_ps(*kv, qv, a[i % 2]);
                            }
                        }
                    }
                    for (h, a) in acc.iter().enumerate() {
                        *out.add(h * visible + p) = hsum(_mm256_add_ps(a[0], a[1])) * scale;
                    }
                }
            }
        }

        /// SAFETY (callers): as `super::values` asserts, with G heads.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) unsafe fn values<const G: usize>(
            w: *const f32,
            v: *const f16,
            stride: usize,
            dim: usize,
            visible: usize,
            o: *mut f32,
        ) {
            // SAFETY: as in `scores`; o holds G · dim floats.
            unsafe {
                for c in (0..dim).step_by(32) {
                    let mut acc = [[_mm256_setzero_ps(); 4]; G];
                    for p in 0..visible {
                        let row = v.add(p * stride + c);
                        if p + PREFETCH < visible {
                            _mm_prefetch::<_MM_HINT_T0>(v.add((p + PREFETCH) * stride + c).cast());
                        }
                        let vr: [__m256; 4] = std::array::from_fn(|i| load8(row.add(8 * i)));
                        for (h, a) in acc.iter_mut().enumerate() {
                            let wv = _mm256_set1_ps(*w.add(h * visible + p));
                            for (ai, vv) in a.iter_mut().zip(vr) {
                                *ai = _mm256_fmadd_ps(wv, vv, *ai);
                            }
                        }
                    }
                    for (h, a) in acc.iter().enumerate() {
                        for (i, ai) in a.iter().enumerate() {
                            _mm256_storeu_ps(o.add(h * dim + c + 8 * i), *ai);
                        }
                    }
                }
            }
        }
    }
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

/// A sum in eight independent lanes (vectorizable, unlike one running sum).
#[inline]
fn sum_lanes(xs: &[f32]) -> f32 {
    let (chunks, rest) = xs.as_chunks::<8>();
    let mut acc = [0f32; 8];
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
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
    fn the_vector_path_matches_the_generic_one() {
        if !vector::usable() {
            println!("SKIPPED: this CPU has no F16C, so the vector path never runs here");
            return;
        }
        for (dim, kv_heads, group) in [(64, 3, 3), (64, 2, 4), (128, 2, 1), (32, 1, 2)] {
            let heads = kv_heads * group;
            let width = kv_heads * dim;
            let lens = [1usize, 37, 5];
            let tokens = [1usize, 1, 5];
            let caches: Vec<(Vec<f16>, Vec<f16>)> = lens
                .iter()
                .enumerate()
                .map(|(i, &n)| {
                    let k = crate::ops::test_values(n * width, 10 + i as u64);
                    let v = crate::ops::test_values(n * width, 20 + i as u64);
                    let half = |x: Vec<f32>| x.into_iter().map(f16::from_f32).collect();
                    (half(k), half(v))
                })
                .collect();
            let mut row = 0;
            let seqs: Vec<SeqAttention<'_, f16>> = caches
                .iter()
                .zip(tokens)
                .map(|((k, v), t)| {
                    let s = SeqAttention {
                        k,
                        v,
                        row,
                        tokens: t,
                    };
                    row += t;
                    s
                })
                .collect();
            let q: Vec<f32> = crate::ops::test_values(row * heads * dim, 3)
                .into_iter()
                .map(|x| 4.0 * x)
                .collect();
            let run = |vectors: bool| {
                let mut out = vec![0f32; row * heads * dim];
                attention_on(&q, &mut out, &seqs, heads, kv_heads, dim, vectors);
                out
            };
            let (fast, plain) = (run(true), run(false));
            for (i, (a, b)) in fast.iter().zip(&plain).enumerate() {
                assert!(
                    (a - b).abs() < 1e-5,
                    "dim {dim}, group {group}, element {i}: {a} vs {b}"
                );
            }
            assert!(
                plain.iter().any(|x| x.abs() > 0.05),
                "the outputs are not all near zero"
            );
        }
    }

    #[test]
    fn lane_sums_cover_whole_chunks_and_the_rest() {
        assert_eq!(sum_lanes(&[1.0; 19]), 19.0);
        assert_eq!(sum_lanes(&[]), 0.0);
    }

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
