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
    let vectors = vector::usable();
    let transposed = vectors && super::cpu::features().avx512f;
    attention_on(q, out, seqs, heads, kv_heads, head_dim, vectors, transposed);
}

/// `attention` with the transposed-key scores allowed or not, for benchmarks (they need
/// AVX-512F: allowing them elsewhere panics).
#[cfg(any(test, feature = "testing"))]
pub fn attention_with<T: KvElem>(
    q: &[f32],
    out: &mut [f32],
    seqs: &[SeqAttention<'_, T>],
    (heads, kv_heads, head_dim): (usize, usize, usize),
    transposed: bool,
) {
    let vectors = vector::usable();
    attention_on(q, out, seqs, heads, kv_heads, head_dim, vectors, transposed);
}

/// `attention`, with the vector path for f16 caches allowed or not, and the transposed-key
/// scores (AVX-512F) for fresh prompts allowed or not: tests compare them.
#[allow(clippy::too_many_arguments)]
fn attention_on<T: KvElem>(
    q: &[f32],
    out: &mut [f32],
    seqs: &[SeqAttention<'_, T>],
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vectors: bool,
    transposed: bool,
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
    let wide = vectors && super::cpu::features().avx512f;
    // One cell per (row, kv head): the `group` query heads of that kv head, head_dim each. Each
    // task writes its own cell through a shared pointer: the sequences' rows are disjoint and
    // inside `out` (asserted), and a task is one (row, kv head). A lock per cell cost more than
    // the cell's softmax, its cache line shared between the workers.
    assert!(
        seqs.iter()
            .all(|s| (s.row + s.tokens) * heads * head_dim <= out.len())
            && seqs.windows(2).all(|w| w[0].row + w[0].tokens <= w[1].row),
        "attention: sequences' rows must be in order, disjoint and inside the output"
    );
    let cell = group * head_dim;
    let cells = SharedOut(out.as_mut_ptr());
    let cells = &cells;
    // Sequences with enough query tokens read their keys transposed (see `transpose_keys`).
    let keys_t: Vec<Option<Vec<f32>>> = seqs
        .iter()
        .map(|seq| {
            let k = T::as_f16(seq.k).filter(|_| vectors && transposed)?;
            let total = k.len() / (kv_heads * head_dim).max(1);
            // Enough queries to repay the copy, and most of the keys this call's own: with a
            // long cached prefix the copy costs more than it saves.
            (seq.tokens >= TRANSPOSE_FROM && 2 * seq.tokens >= total)
                .then(|| transpose_keys(k, kv_heads, head_dim))
        })
        .collect();
    // Longest rows first: a causal prefill's last queries read the most keys, and the pool
    // hands out the tasks in order.
    let mut tasks = Vec::new();
    for (s, seq) in seqs.iter().enumerate() {
        for j in (0..seq.tokens).rev() {
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
            if let Some(kt) = &keys_t[s] {
                let per_head = kt.len() / kv_heads;
                vector::scores_transposed(
                    qs,
                    &kt[g * per_head..(g + 1) * per_head],
                    head_dim,
                    visible,
                    scale,
                    &mut scores,
                );
            } else if let Some((k, _)) = f16s {
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
            // SAFETY: cell (row, g) lies inside `out` (rows below the asserted bound, g below
            // kv_heads) and no other task has the same (row, g); `out` outlives the pool call.
            let o = unsafe {
                std::slice::from_raw_parts_mut(cells.0.add((row * kv_heads + g) * cell), cell)
            };
            let mut sums = [0f32; MAX_GROUP];
            for (sc, sum) in scores.chunks_exact_mut(visible).zip(sums.iter_mut()) {
                *sum = exponentials(sc, wide);
            }
            // Each cached value row is read once for all the heads that share it.
            if let Some((_, v)) = f16s {
                vector::values(&scores, &v[at(0)..], width, head_dim, visible, o);
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

    /// `scores` from the kv head's keys as `transpose_keys` lays them out (`kt`: that head's
    /// blocks), sixteen keys to an AVX-512 vector: the same bits as `scores`, with no horizontal
    /// sums and one query broadcast for two vectors of keys.
    pub(super) fn scores_transposed(
        q: &[f32],
        kt: &[f32],
        dim: usize,
        visible: usize,
        scale: f32,
        scores: &mut [f32],
    ) {
        let group = q.len() / dim.max(1);
        assert!(
            super::super::cpu::features().avx512f,
            "the transposed scores need AVX-512F"
        );
        assert!(
            dim > 0
                && dim.is_multiple_of(32)
                && (1..=4).contains(&group)
                && q.len() == group * dim
                && visible > 0
                && kt.len() >= visible.div_ceil(super::KEYS) * dim * super::KEYS
                && scores.len() >= group * visible
                && usable()
        );
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        ))]
        // SAFETY: the assertion bounds every access (whole blocks of kt up to `visible` keys,
        // `group` heads of q, group · visible scores) and checks the CPU features.
        unsafe {
            let (q, k, s) = (q.as_ptr(), kt.as_ptr(), scores.as_mut_ptr());
            match group {
                1 => x86::zmm::scores::<1>(q, k, dim, visible, scale, s),
                2 => x86::zmm::scores::<2>(q, k, dim, visible, scale, s),
                3 => x86::zmm::scores::<3>(q, k, dim, visible, scale, s),
                _ => x86::zmm::scores::<4>(q, k, dim, visible, scale, s),
            }
        }
    }

    /// `o_h = Σ_p w[h · visible + p] · v_p` for the group's heads (`o`: group × dim).
    /// With AVX-512F, sixteen dimensions to a vector (the same operations on each, so the same
    /// bits).
    pub(super) fn values(
        w: &[f32],
        v: &[f16],
        stride: usize,
        dim: usize,
        visible: usize,
        o: &mut [f32],
    ) {
        let wide = super::super::cpu::features().avx512f;
        values_on(w, v, stride, dim, visible, o, wide);
    }

    /// `values`, on sixteen-lane vectors or not (tests compare the two).
    pub(super) fn values_on(
        w: &[f32],
        v: &[f16],
        stride: usize,
        dim: usize,
        visible: usize,
        o: &mut [f32],
        wide: bool,
    ) {
        let group = o.len() / dim.max(1);
        assert!(fits(dim, group, o.len(), v, stride, visible) && w.len() >= group * visible);
        assert!(
            !wide || super::super::cpu::features().avx512f,
            "sixteen-lane values need AVX-512F"
        );
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        ))]
        // SAFETY: as in `scores`; AVX-512F checked for the wide kernel.
        unsafe {
            let (w, v, o) = (w.as_ptr(), v.as_ptr(), o.as_mut_ptr());
            if wide {
                match group {
                    1 => x86::zmm::values::<1>(w, v, stride, dim, visible, o),
                    2 => x86::zmm::values::<2>(w, v, stride, dim, visible, o),
                    3 => x86::zmm::values::<3>(w, v, stride, dim, visible, o),
                    _ => x86::zmm::values::<4>(w, v, stride, dim, visible, o),
                }
                return;
            }
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

        /// Sixteen lanes with AVX-512F: the weighted sums of values, and the scores of sixteen
        /// keys at a time from keys transposed by `transpose_keys`. For the scores, each lane of `scores`' two accumulators adds, in order, dimensions c + l and
        /// c + 16 + l (the first) and c + 8 + l and c + 24 + l (the second) for each 32 from c,
        /// and the lanes are then summed in `hsum`'s tree; here a vector lane is a key instead,
        /// and the same operations in the same order give each key's score the same bits.
        pub(super) mod zmm {
            use super::super::super::{KEYS, PREFETCH};
            use std::arch::x86_64::*;

            /// `hsum`'s lane `l` for `H` blocks of keys from block `b` and `G` heads: the two
            /// accumulators' sum. Loops, not closures: a closure would not inherit the target
            /// features, and AVX-512 is not the build's.
            ///
            /// SAFETY (callers): blocks b..b + H are inside `kt`, `q` holds G × dim.
            #[inline]
            #[target_feature(enable = "avx512f")]
            unsafe fn lane<const G: usize, const H: usize>(
                q: *const f32,
                kt: *const f32,
                dim: usize,
                b: usize,
                l: usize,
            ) -> [[__m512; H]; G] {
                // SAFETY: d < dim, so every read is inside the blocks and the heads.
                unsafe {
                    let mut acc = [[[_mm512_setzero_ps(); 2]; H]; G];
                    for c in (0..dim).step_by(32) {
                        for i in 0..4 {
                            let d = c + 8 * i + l;
                            let mut kv = [_mm512_setzero_ps(); H];
                            for (k, kv) in kv.iter_mut().enumerate() {
                                *kv = _mm512_loadu_ps(kt.add(((b + k) * dim + d) * KEYS));
                            }
                            for (h, a) in acc.iter_mut().enumerate() {
                                let qv = _mm512_set1_ps(*q.add(h * dim + d));
                                for (a, kv) in a.iter_mut().zip(kv) {
                                    a[i % 2] = _mm512_fmadd_ps(kv, qv, a[i % 2]);
                                }
                            }
                        }
                    }
                    let mut sums = [[_mm512_setzero_ps(); H]; G];
                    for (s, a) in sums.iter_mut().zip(&acc) {
                        for (s, a) in s.iter_mut().zip(a) {
                            *s = _mm512_add_ps(a[0], a[1]);
                        }
                    }
                    sums
                }
            }

            /// Lane sums added head by head and block by block.
            #[inline]
            #[target_feature(enable = "avx512f")]
            fn add<const G: usize, const H: usize>(
                mut a: [[__m512; H]; G],
                b: [[__m512; H]; G],
            ) -> [[__m512; H]; G] {
                for (a, b) in a.iter_mut().zip(&b) {
                    for (a, b) in a.iter_mut().zip(b) {
                        *a = _mm512_add_ps(*a, *b);
                    }
                }
                a
            }

            /// The scores of blocks b..b + H (keys b · 16..), for G heads, into `out`.
            ///
            /// SAFETY (callers): as `lane`; `out` holds G rows of `visible` scores.
            #[inline]
            #[target_feature(enable = "avx512f")]
            unsafe fn blocks<const G: usize, const H: usize>(
                q: *const f32,
                kt: *const f32,
                dim: usize,
                b: usize,
                visible: usize,
                scale: f32,
                out: *mut f32,
            ) {
                // SAFETY: as the callers vouch; stores stay below h · visible + visible.
                unsafe {
                    let even = add(
                        add(
                            lane::<G, H>(q, kt, dim, b, 0),
                            lane::<G, H>(q, kt, dim, b, 4),
                        ),
                        add(
                            lane::<G, H>(q, kt, dim, b, 2),
                            lane::<G, H>(q, kt, dim, b, 6),
                        ),
                    );
                    let odd = add(
                        add(
                            lane::<G, H>(q, kt, dim, b, 1),
                            lane::<G, H>(q, kt, dim, b, 5),
                        ),
                        add(
                            lane::<G, H>(q, kt, dim, b, 3),
                            lane::<G, H>(q, kt, dim, b, 7),
                        ),
                    );
                    let scale = _mm512_set1_ps(scale);
                    for (h, sums) in add(even, odd).iter().enumerate() {
                        for (k, sum) in sums.iter().enumerate() {
                            let first = (b + k) * KEYS;
                            let n = visible.saturating_sub(first).min(KEYS);
                            let mask = ((1u32 << n) - 1) as __mmask16;
                            let r = _mm512_mul_ps(*sum, scale);
                            _mm512_mask_storeu_ps(out.add(h * visible + first), mask, r);
                        }
                    }
                }
            }

            /// Sixteen f16 at `p` as f32.
            ///
            /// SAFETY (callers): p has 16 readable f16.
            #[inline]
            #[target_feature(enable = "avx512f")]
            unsafe fn load16(p: *const half::f16) -> __m512 {
                // SAFETY: as the callers vouch.
                unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
            }

            /// `C` vectors (16 dimensions each) of G heads' outputs from dimension c, over all
            /// visible positions in order: each lane's sum is the AVX2 kernel's, operation for
            /// operation.
            ///
            /// SAFETY (callers): as `values`, with c + 16 · C <= dim.
            #[inline]
            #[target_feature(enable = "avx512f")]
            unsafe fn chunk<const G: usize, const C: usize>(
                w: *const f32,
                v: *const half::f16,
                stride: usize,
                dim: usize,
                visible: usize,
                c: usize,
                o: *mut f32,
            ) {
                // SAFETY: rows p < visible of v, G · visible weights, G · dim outputs.
                unsafe {
                    let mut acc = [[_mm512_setzero_ps(); C]; G];
                    for p in 0..visible {
                        let row = v.add(p * stride + c);
                        if p + PREFETCH < visible {
                            let ahead = v.add((p + PREFETCH) * stride + c).cast::<i8>();
                            _mm_prefetch::<_MM_HINT_T0>(ahead);
                        }
                        let mut vr = [_mm512_setzero_ps(); C];
                        for (i, vr) in vr.iter_mut().enumerate() {
                            *vr = load16(row.add(16 * i));
                        }
                        for (h, a) in acc.iter_mut().enumerate() {
                            let wv = _mm512_set1_ps(*w.add(h * visible + p));
                            for (a, vv) in a.iter_mut().zip(vr) {
                                *a = _mm512_fmadd_ps(wv, vv, *a);
                            }
                        }
                    }
                    for (h, a) in acc.iter().enumerate() {
                        for (i, a) in a.iter().enumerate() {
                            _mm512_storeu_ps(o.add(h * dim + c + 16 * i), *a);
                        }
                    }
                }
            }

            /// `super::super::values` with sixteen dimensions to a vector: 64 at a time (one
            /// query broadcast for four vectors), then 32.
            ///
            /// SAFETY (callers): as `super::super::values` asserts, with G heads, on a CPU with
            /// AVX-512F.
            #[target_feature(enable = "avx512f")]
            pub(in super::super) unsafe fn values<const G: usize>(
                w: *const f32,
                v: *const half::f16,
                stride: usize,
                dim: usize,
                visible: usize,
                o: *mut f32,
            ) {
                // SAFETY: the chunks cover dim (a multiple of 32) exactly.
                unsafe {
                    let mut c = 0;
                    while c + 64 <= dim {
                        chunk::<G, 4>(w, v, stride, dim, visible, c, o);
                        c += 64;
                    }
                    if c < dim {
                        chunk::<G, 2>(w, v, stride, dim, visible, c, o);
                    }
                }
            }

            /// SAFETY (callers): as `super::super::scores_transposed` asserts, with G heads, on
            /// a CPU with AVX-512F.
            #[target_feature(enable = "avx512f")]
            pub(in super::super) unsafe fn scores<const G: usize>(
                q: *const f32,
                kt: *const f32,
                dim: usize,
                visible: usize,
                scale: f32,
                out: *mut f32,
            ) {
                // SAFETY: whole blocks below `visible.div_ceil(16)`, two sharing each query
                // broadcast, the last alone when their number is odd.
                unsafe {
                    let n = visible.div_ceil(KEYS);
                    for b in (0..n).step_by(2) {
                        if b + 1 < n {
                            blocks::<G, 2>(q, kt, dim, b, visible, scale, out);
                        } else {
                            blocks::<G, 1>(q, kt, dim, b, visible, scale, out);
                        }
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

/// The output buffer, shared with the worker pool for disjoint writes.
struct SharedOut(*mut f32);
// SAFETY: every task writes its own cell (see `attention_on`), so sharing the pointer races on
// nothing.
unsafe impl Sync for SharedOut {}

/// Keys per block of `transpose_keys`: one AVX-512 vector's lanes.
const KEYS: usize = 16;

/// Query tokens of one sequence from which its keys are transposed for the scores: every query
/// reads the whole transposed copy, so a few of them repay the copy (decode steps, one token a
/// sequence, read the cache as it is).
const TRANSPOSE_FROM: usize = 8;

/// An f16 cache's keys (positions × kv_heads × dim) as f32, kv head by kv head, in blocks of
/// `KEYS` positions stored dimension by dimension: block b's dimension d holds that dimension of
/// positions b · KEYS.. side by side, zero past the last position. Each vector load is then one
/// dimension of sixteen keys, and sixteen scores come out of one vector with no horizontal sums.
fn transpose_keys(k: &[f16], kv_heads: usize, dim: usize) -> Vec<f32> {
    let width = kv_heads * dim;
    let total = k.len() / width.max(1);
    let blocks = total.div_ceil(KEYS);
    let mut kt = vec![0f32; kv_heads * blocks * dim * KEYS];
    // One writer per (kv head, block).
    let cells: Vec<Mutex<&mut [f32]>> = kt.chunks_mut(dim * KEYS).map(Mutex::new).collect();
    candle_core::utils::barrier_pool().execute_chunked(cells.len(), |range| {
        let mut row = vec![0f32; dim];
        for i in range {
            let (g, b) = (i / blocks, i % blocks);
            let Ok(mut dst) = cells[i].lock() else {
                continue;
            };
            for lane in 0..KEYS.min(total - b * KEYS) {
                let at = (b * KEYS + lane) * width + g * dim;
                widen(&k[at..at + dim], &mut row);
                for (d, &x) in row.iter().enumerate() {
                    dst[d * KEYS + lane] = x;
                }
            }
        }
    });
    drop(cells);
    kt
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
#[inline(always)]
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

/// A head's scores turned into e^(score - max) in place; returns their sum. With `wide`
/// (AVX-512F present), compiled for sixteen-lane vectors: every operation is element by element
/// or in `max_lanes`' and `sum_lanes`' fixed lanes, so the bits are the same.
#[inline]
fn exponentials(sc: &mut [f32], wide: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if wide {
        /// # Safety
        /// The CPU has AVX-512F.
        #[target_feature(enable = "avx512f")]
        unsafe fn on_avx512(sc: &mut [f32]) -> f32 {
            exponentials_here(sc)
        }
        // SAFETY: the callers pass `wide` only where AVX-512F is present.
        return unsafe { on_avx512(sc) };
    }
    let _ = wide;
    exponentials_here(sc)
}

/// `exponentials` for the vector width of the function it is inlined into.
#[inline(always)]
fn exponentials_here(sc: &mut [f32]) -> f32 {
    let max = max_lanes(sc);
    // Two loops, so the compiler vectorizes the exponentials (libm's are scalar calls).
    for x in sc.iter_mut() {
        *x = exp_nonpositive(*x - max);
    }
    sum_lanes(sc)
}

/// The largest value, NaN aside (as `f32::max` folds), in eight independent lanes: the
/// maximum of finite values does not depend on the order, and the lanes vectorize.
#[inline(always)]
fn max_lanes(xs: &[f32]) -> f32 {
    let (chunks, rest) = xs.as_chunks::<8>();
    let mut acc = [f32::NEG_INFINITY; 8];
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    acc.iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x))
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

    /// A batch for `attention_on`: random f16 caches for sequences of (cached positions, this
    /// call's tokens), and queries for all their tokens.
    struct Cases {
        caches: Vec<(Vec<f16>, Vec<f16>)>,
        tokens: Vec<usize>,
        q: Vec<f32>,
        shape: (usize, usize, usize),
    }

    impl Cases {
        fn new(
            shapes: &[(usize, usize)],
            heads: usize,
            kv_heads: usize,
            dim: usize,
            seed: u64,
        ) -> Self {
            let width = kv_heads * dim;
            let half = |x: Vec<f32>| x.into_iter().map(f16::from_f32).collect();
            let caches = shapes
                .iter()
                .zip(seed..)
                .map(|(&(n, _), s)| {
                    let k = crate::ops::test_values(n * width, s);
                    let v = crate::ops::test_values(n * width, s + 100);
                    (half(k), half(v))
                })
                .collect();
            let tokens: Vec<usize> = shapes.iter().map(|&(_, t)| t).collect();
            let rows: usize = tokens.iter().sum();
            let q = crate::ops::test_values(rows * heads * dim, seed + 200)
                .into_iter()
                .map(|x| 4.0 * x)
                .collect();
            Cases {
                caches,
                tokens,
                q,
                shape: (heads, kv_heads, dim),
            }
        }

        /// `attention_on` over the batch, the vector path and the transposed scores allowed or
        /// not.
        fn run(&self, vectors: bool, transposed: bool) -> Vec<f32> {
            let (heads, kv_heads, dim) = self.shape;
            let mut row = 0;
            let seqs: Vec<SeqAttention<'_, f16>> = self
                .caches
                .iter()
                .zip(&self.tokens)
                .map(|((k, v), &tokens)| {
                    let s = SeqAttention { k, v, row, tokens };
                    row += tokens;
                    s
                })
                .collect();
            let mut out = vec![0f32; self.q.len()];
            attention_on(
                &self.q, &mut out, &seqs, heads, kv_heads, dim, vectors, transposed,
            );
            out
        }
    }

    /// Every element of `got` agrees with `want` as `same` says, and `want` is not all near zero.
    fn agree(
        got: &[f32],
        want: &[f32],
        same: impl Fn(f32, f32) -> bool,
        (dim, group): (usize, usize),
    ) {
        assert_eq!(got.len(), want.len());
        for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
            assert!(
                same(a, b),
                "dim {dim}, group {group}, element {i}: {a} vs {b}"
            );
        }
        assert!(
            want.iter().any(|x| x.abs() > 0.05),
            "the outputs are not all near zero"
        );
    }

    #[test]
    fn the_vector_path_matches_the_generic_one() {
        if !vector::usable() {
            println!("SKIPPED: this CPU has no F16C, so the vector path never runs here");
            return;
        }
        for (dim, kv_heads, group) in [(64, 3, 3), (64, 2, 4), (128, 2, 1), (32, 1, 2)] {
            let batch = Cases::new(
                &[(1, 1), (37, 1), (5, 5)],
                kv_heads * group,
                kv_heads,
                dim,
                10,
            );
            let (fast, plain) = (batch.run(true, false), batch.run(false, false));
            agree(&fast, &plain, |a, b| (a - b).abs() < 1e-5, (dim, group));
        }
    }

    #[test]
    fn transposed_keys_give_the_same_bits() {
        if !vector::usable() || !crate::ops::cpu::features().avx512f {
            println!(
                "SKIPPED: the transposed scores need AVX-512F and F16C, not both in use here (FLYWHEEL_NO_AVX512 or the CPU)"
            );
            return;
        }
        // Cached positions and this call's tokens (the last ones): odd and even numbers of
        // 16-key blocks, whole and partial, short prefixes already cached; and sequences that
        // stay on the per-key path (too few tokens, or a long cached prefix).
        let shapes = [
            (8usize, 8usize),
            (37, 29),
            (5, 5),
            (70, 9),
            (17, 7),
            (1, 1),
            (40, 40),
            (64, 40),
            (20, 12),
            (33, 12),
        ];
        for (dim, kv_heads, group) in [(64, 3, 3), (64, 2, 4), (128, 2, 1), (32, 1, 2)] {
            let batch = Cases::new(&shapes, kv_heads * group, kv_heads, dim, 30);
            let (transposed, plain) = (batch.run(true, true), batch.run(true, false));
            agree(
                &transposed,
                &plain,
                |a, b| a.to_bits() == b.to_bits(),
                (dim, group),
            );
        }
    }

    #[test]
    fn sixteen_lane_values_give_the_same_bits() {
        if !vector::usable() || !crate::ops::cpu::features().avx512f {
            println!("SKIPPED: sixteen-lane values need AVX-512F and F16C, not both in use here (FLYWHEEL_NO_AVX512 or the CPU)");
            return;
        }
        for dim in [32usize, 64, 96, 128] {
            for group in 1..=4 {
                for visible in [1usize, 5, 37] {
                    let stride = 3 * dim;
                    let v: Vec<f16> = crate::ops::test_values(visible * stride, dim as u64)
                        .into_iter()
                        .map(f16::from_f32)
                        .collect();
                    let w: Vec<f32> = crate::ops::test_values(group * visible, 7)
                        .into_iter()
                        .map(f32::abs)
                        .collect();
                    let run = |wide: bool| {
                        let mut o = vec![0f32; group * dim];
                        vector::values_on(&w, &v, stride, dim, visible, &mut o, wide);
                        o
                    };
                    let (wide, narrow) = (run(true), run(false));
                    for (i, (a, b)) in wide.iter().zip(&narrow).enumerate() {
                        assert_eq!(
                            a.to_bits(),
                            b.to_bits(),
                            "dim {dim}, group {group}, {visible} rows, element {i}"
                        );
                    }
                    assert!(narrow.iter().any(|x| *x != 0.0));
                }
            }
        }
    }

    #[test]
    fn lane_sums_cover_whole_chunks_and_the_rest() {
        assert_eq!(sum_lanes(&[1.0; 19]), 19.0);
        assert_eq!(sum_lanes(&[]), 0.0);
    }

    #[test]
    fn the_exponentials_have_the_same_bits_on_avx512() {
        if !crate::ops::cpu::features().avx512f {
            println!("SKIPPED: AVX-512F is not in use here (FLYWHEEL_NO_AVX512 or the CPU)");
            return;
        }
        for n in [1usize, 7, 16, 37, 300] {
            let scores: Vec<f32> = crate::ops::test_values(n, n as u64)
                .into_iter()
                .map(|x| 30.0 * x)
                .collect();
            let (mut wide, mut narrow) = (scores.clone(), scores);
            let (a, b) = (
                exponentials(&mut wide, true),
                exponentials(&mut narrow, false),
            );
            assert_eq!(a.to_bits(), b.to_bits(), "{n} scores: sums {a} vs {b}");
            assert!(wide
                .iter()
                .zip(&narrow)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
            assert!(narrow.contains(&1.0) && narrow.iter().all(|&x| x <= 1.0));
        }
    }

    #[test]
    fn lane_maxima_match_the_folded_maximum() {
        let xs = crate::ops::test_values(37, 9);
        for n in [0, 1, 7, 8, 9, 16, 37] {
            let want = xs[..n].iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            assert_eq!(max_lanes(&xs[..n]).to_bits(), want.to_bits(), "{n} values");
        }
        // The largest value in the rest after whole chunks, and NaN passed over.
        let mut ys = vec![-1.0f32; 19];
        ys[18] = 3.0;
        ys[2] = f32::NAN;
        assert_eq!(max_lanes(&ys), 3.0);
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
