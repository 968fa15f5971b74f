//! Batched multi-adapter LoRA on the CPU: for each row t of a batch, with its own adapter a(t) (or
//! none), `y[t, off..off+n] += scale[a] · (x[t] · A[a]ᵀ) · B[a]ᵀ`, never merged into the shared
//! base. `bgmv_add` is the f32 reference, one row at a time. `lora_add` is what the engine serves
//! with: rows sharing a module run together (SGMV), so a module's weights are read once per step
//! however many rows use it, and modules may be quantized like a Q8_0 base (`Q8LowRank`), so
//! eight distinct adapters in a batch stream about a quarter of the bytes they would in f32.
#![allow(unsafe_code)]

use super::q4::{Q4Input, Q4Narrow, Q4Rows};
use super::qgemm::{Q8Narrow, QuantRows, QuantVec, BLOCK, NARROW_GROUP};

/// One low-rank module, stored for row-major streaming: Aᵀ (in × r) and Bᵀ (r × out).
pub struct LowRank {
    pub rank: usize,
    pub input: usize,
    pub output: usize,
    pub a_t: Vec<f32>,
    pub b_t: Vec<f32>,
}

impl LowRank {
    /// One module from the CUDA kernels' layout: `a` (rank, input) and `b` (output, rank), both
    /// row-major (the adapter's `lora_A` and `lora_B` as stored), transposed for streaming.
    pub fn from_kernel_layout(
        a: &[f32],
        b: &[f32],
        rank: usize,
        input: usize,
        output: usize,
    ) -> Self {
        let mut a_t = vec![0f32; input * rank];
        let mut b_t = vec![0f32; rank * output];
        for j in 0..rank {
            for i in 0..input {
                a_t[i * rank + j] = a[j * input + i];
            }
            for o in 0..output {
                b_t[j * output + o] = b[o * rank + j];
            }
        }
        Self {
            rank,
            input,
            output,
            a_t,
            b_t,
        }
    }
}

impl LowRank {
    /// The factors as a PEFT adapter stores them, row-major: A (rank × input), B (output ×
    /// rank).
    pub fn factors(&self) -> (Vec<f32>, Vec<f32>) {
        let (r, input, output) = (self.rank, self.input, self.output);
        let mut a = vec![0f32; r * input];
        for k in 0..input {
            for j in 0..r {
                a[j * input + k] = self.a_t[k * r + j];
            }
        }
        let mut b = vec![0f32; output * r];
        for j in 0..r {
            for o in 0..output {
                b[o * r + j] = self.b_t[j * output + o];
            }
        }
        (a, b)
    }
}

/// A module applied to a slice of the output columns.
pub struct Slot<'a> {
    pub module: &'a LowRank,
    pub scale: f32,
    /// First output column it writes.
    pub offset: usize,
}

/// `rows[t]` lists the modules row t runs with (empty: base only). `x`: n × in, `y`: n × out_total.
/// Rows are spread over candle's worker pool; each row is written by one worker.
pub fn bgmv_add(y: &mut [f32], out_total: usize, x: &[f32], input: usize, rows: &[Vec<Slot<'_>>]) {
    let outputs: Vec<std::sync::Mutex<&mut [f32]>> =
        y.chunks_mut(out_total).map(std::sync::Mutex::new).collect();
    let busy: Vec<usize> = (0..rows.len()).filter(|&t| !rows[t].is_empty()).collect();
    candle_core::utils::barrier_pool().execute_chunked(busy.len(), |range| {
        let mut v = Vec::new();
        for &t in &busy[range] {
            let Ok(mut yr) = outputs[t].lock() else {
                continue;
            };
            apply_row(&mut yr, &x[t * input..(t + 1) * input], &rows[t], &mut v);
        }
    });
}

fn apply_row(yr: &mut [f32], xr: &[f32], slots: &[Slot<'_>], v: &mut Vec<f32>) {
    for s in slots {
        let m = s.module;
        let r = m.rank;
        // Shrink: v = x · Aᵀ.
        v.clear();
        v.resize(r, 0f32);
        for (k, &xk) in xr.iter().enumerate().take(m.input) {
            let a = &m.a_t[k * r..(k + 1) * r];
            for (vj, aj) in v.iter_mut().zip(a) {
                *vj += xk * aj;
            }
        }
        // Expand: y[off..off+out] += scale · v · Bᵀ.
        let dst = &mut yr[s.offset..s.offset + m.output];
        for (j, &vj) in v.iter().enumerate() {
            let c = vj * s.scale;
            let b = &m.b_t[j * m.output..(j + 1) * m.output];
            for (d, bj) in dst.iter_mut().zip(b) {
                *d += c * bj;
            }
        }
    }
}

/// A low-rank module quantized like a Q8_0 base: A (rank × input) in the int8 kernels' layout
/// (its few rows tiled against each input row), and B (output × rank) as a `Q8Narrow` (one scale
/// per eight outputs), expanded against the row's rank vector quantized to int8, in integers.
pub struct Q8LowRank {
    pub rank: usize,
    pub input: usize,
    pub output: usize,
    a: QuantRows,
    b: Q8Narrow,
}

impl Q8LowRank {
    /// `None` when the input or output width is not a multiple of 32 (the module stays f32).
    pub fn quantize(m: &LowRank) -> Option<Self> {
        let (a, b) = m.factors();
        Self::from_factors(&a, &b, m.rank, m.input, m.output)
    }

    /// From the factors as a PEFT adapter stores them, row-major: `a` (rank × input) and `b`
    /// (output × rank). The same module as `quantize` of its `LowRank`, without the round trip
    /// through the transposed f32 layout. `None` as for `quantize`, or when the lengths do not
    /// match the shape.
    pub fn from_factors(
        a: &[f32],
        b: &[f32],
        rank: usize,
        input: usize,
        output: usize,
    ) -> Option<Self> {
        if rank == 0
            || !input.is_multiple_of(BLOCK)
            || !output.is_multiple_of(BLOCK)
            || a.len() != rank * input
            || b.len() != output * rank
        {
            return None;
        }
        Some(Self {
            rank,
            input,
            output,
            a: QuantRows::new(a, rank, input),
            b: Q8Narrow::quantize(b, output, rank)?,
        })
    }

    pub fn bytes(&self) -> usize {
        self.a.bytes() + self.b.bytes()
    }
}

/// A low-rank module in 4 bits (`ops::q4`): A as `Q4Rows`, B as `Q4Narrow`. About 55% of the
/// bytes of its `Q8LowRank`.
pub struct Q4LowRank {
    pub rank: usize,
    pub input: usize,
    pub output: usize,
    a: Q4Rows,
    b: Q4Narrow,
}

impl Q4LowRank {
    /// From the factors as a PEFT adapter stores them (see `Q8LowRank::from_factors`). `None`
    /// when the input is not a multiple of 64, the output or the rank not of 8 (below rank 8,
    /// padding and B's per-row scales would leave 4 bits no smaller than int8), or the lengths
    /// do not match the shape.
    pub fn from_factors(
        a: &[f32],
        b: &[f32],
        rank: usize,
        input: usize,
        output: usize,
    ) -> Option<Self> {
        if rank == 0
            || !rank.is_multiple_of(8)
            || a.len() != rank * input
            || b.len() != output * rank
        {
            return None;
        }
        Some(Self {
            rank,
            input,
            output,
            a: Q4Rows::quantize(a, rank, input)?,
            b: Q4Narrow::quantize(b, output, rank)?,
        })
    }

    /// The same module as an f32 `LowRank` holds it.
    pub fn quantize(m: &LowRank) -> Option<Self> {
        let (a, b) = m.factors();
        Self::from_factors(&a, &b, m.rank, m.input, m.output)
    }

    pub fn bytes(&self) -> usize {
        self.a.bytes() + self.b.bytes()
    }
}

/// A served module: f32, or quantized when its base is (int8, or 4 bits where the engine is
/// told to trade the adapters' precision for their bandwidth).
pub enum Module {
    F32(LowRank),
    Q8(Q8LowRank),
    Q4(Q4LowRank),
}

impl Module {
    pub fn rank(&self) -> usize {
        match self {
            Module::F32(m) => m.rank,
            Module::Q8(m) => m.rank,
            Module::Q4(m) => m.rank,
        }
    }
    pub fn input(&self) -> usize {
        match self {
            Module::F32(m) => m.input,
            Module::Q8(m) => m.input,
            Module::Q4(m) => m.input,
        }
    }
    pub fn output(&self) -> usize {
        match self {
            Module::F32(m) => m.output,
            Module::Q8(m) => m.output,
            Module::Q4(m) => m.output,
        }
    }
    pub fn bytes(&self) -> usize {
        match self {
            Module::F32(m) => (m.a_t.len() + m.b_t.len()) * std::mem::size_of::<f32>(),
            Module::Q8(m) => m.bytes(),
            Module::Q4(m) => m.bytes(),
        }
    }
    /// The same module quantized, where its shape allows.
    pub fn to_q8(&self) -> Option<Module> {
        match self {
            Module::F32(m) => Q8LowRank::quantize(m).map(Module::Q8),
            Module::Q8(_) | Module::Q4(_) => None,
        }
    }

    /// The same module in 4 bits, where its shape allows.
    pub fn to_q4(&self) -> Option<Module> {
        match self {
            Module::F32(m) => Q4LowRank::quantize(m).map(Module::Q4),
            Module::Q8(_) | Module::Q4(_) => None,
        }
    }
}

/// A served module applied to a slice of the output columns.
pub struct ModuleSlot<'a> {
    pub module: &'a Module,
    pub scale: f32,
    pub offset: usize,
}

/// The output rows, shared with the worker pool for disjoint writes.
struct RowsOut(*mut f32);
// SAFETY: every (row, column) is written by one task only (see `lora_add`).
unsafe impl Sync for RowsOut {}

/// Rows of one group a task shrinks and expands: a module many rows share is split over the
/// pool, and its B is read once per task.
const ROWS_PER_TASK: usize = 4;

/// `rows[t]`: the modules row t runs with (empty: base only); `x`: n × input, `y`: n × out_total;
/// `xq`: x already quantized for the base product, if it was (quantized modules reuse it).
///
/// Rows are grouped by (module, columns) (SGMV), and one pass on the worker pool runs a task per
/// group and up to `ROWS_PER_TASK` of its rows: shrink, `v = scale · x · Aᵀ` (quantized to int8
/// for a quantized module), then expand, `y += v · Bᵀ`, on the rows' columns of that module,
/// which no other task writes.
pub fn lora_add(
    y: &mut [f32],
    out_total: usize,
    x: &[f32],
    xq: Option<&QuantRows>,
    input: usize,
    rows: &[Vec<ModuleSlot<'_>>],
) -> candle_core::Result<()> {
    struct Group<'a> {
        slot: &'a ModuleSlot<'a>,
        rows: Vec<usize>,
    }
    let n = y.len() / out_total.max(1);
    if y.len() != n * out_total || x.len() != n * input || rows.len() > n {
        candle_core::bail!(
            "LoRA: {} outputs of width {out_total}, {} inputs of width {input}, {} row lists",
            y.len(),
            x.len(),
            rows.len()
        );
    }
    let xq = xq.filter(|q| q.rows() == n && q.cols() == input);
    let mut groups: Vec<Group<'_>> = Vec::new();
    for (t, slots) in rows.iter().enumerate() {
        for s in slots {
            if s.module.input() != input || s.offset + s.module.output() > out_total {
                candle_core::bail!(
                    "LoRA: a rank-{} module for {} columns at column {} does not fit a {input} -> \
                     {out_total} projection",
                    s.module.rank(),
                    s.module.output(),
                    s.offset
                );
            }
            let same = |g: &Group<'_>| {
                std::ptr::eq(g.slot.module, s.module)
                    && g.slot.offset == s.offset
                    && g.slot.scale.to_bits() == s.scale.to_bits()
            };
            match groups.iter_mut().find(|g| same(g)) {
                Some(g) => g.rows.push(t),
                None => groups.push(Group {
                    slot: s,
                    rows: vec![t],
                }),
            }
        }
    }
    let tasks: Vec<(&Group<'_>, &[usize])> = groups
        .iter()
        .flat_map(|g| g.rows.chunks(ROWS_PER_TASK).map(move |r| (g, r)))
        .collect();
    let out = RowsOut(y.as_mut_ptr());
    let out = &out;
    candle_core::utils::barrier_pool().execute_chunked(tasks.len(), |range| {
        let mut v = Vec::new();
        let mut w: Vec<[f32; BLOCK]> = Vec::new();
        let mut row = Vec::new();
        for &(g, ts) in &tasks[range] {
            let (slot, output) = (g.slot, g.slot.module.output());
            // All of A and B at once: B arrives while A's dots run, and the cache sees one
            // burst rather than short streams it would learn one at a time.
            if let Module::Q8(m) = slot.module {
                m.a.prefetch();
                m.b.prefetch();
            }
            for &t in ts {
                let start = t * out_total + slot.offset;
                // SAFETY: t < n and offset + output <= out_total (checked when grouping), so
                // the span lies inside `y`, which outlives the pool call. Row t's columns of this
                // slot belong to this group alone (one adapter per row, its modules on disjoint
                // columns), and the group's row t to this task alone.
                let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add(start), output) };
                let xr = &x[t * input..(t + 1) * input];
                v.clear();
                v.resize(slot.module.rank(), 0f32);
                match slot.module {
                    Module::F32(m) => {
                        shrink_f32(m, xr, &mut v);
                        v.iter_mut().for_each(|e| *e *= slot.scale);
                        expand_f32(m, &v, &mut w, dst);
                    }
                    Module::Q8(m) => {
                        match xq {
                            Some(q) => q.dots_with(t, &m.a, &mut v, &mut row),
                            None => {
                                QuantRows::new(xr, 1, input).dots_with(0, &m.a, &mut v, &mut row)
                            }
                        }
                        v.iter_mut().for_each(|e| *e *= slot.scale);
                        let qv = QuantVec::new(&v, m.b.width());
                        m.b.add_product(0..output / NARROW_GROUP, &qv, dst);
                    }
                    Module::Q4(m) => {
                        let own;
                        let (q, at) = match xq {
                            Some(q) => (q, t),
                            None => {
                                own = QuantRows::new(xr, 1, input);
                                (&own, 0)
                            }
                        };
                        m.a.dots(&Q4Input::new(q, at), &mut v);
                        v.iter_mut().for_each(|e| *e *= slot.scale);
                        m.b.add_product(&QuantVec::new(&v, m.b.width()), dst);
                    }
                }
            }
        }
    });
    Ok(())
}

/// `dst += v · Bᵀ` for an f32 module, a block of 32 columns at a time through `w`.
fn expand_f32(m: &LowRank, v: &[f32], w: &mut Vec<[f32; BLOCK]>, dst: &mut [f32]) {
    let (r, output) = (m.rank, m.output);
    w.resize(r, [0f32; BLOCK]);
    for (c, d) in (0..output).step_by(BLOCK).zip(dst.chunks_mut(BLOCK)) {
        let width = d.len();
        for (j, wj) in w.iter_mut().enumerate() {
            wj[..width].copy_from_slice(&m.b_t[j * output + c..][..width]);
        }
        let mut acc = [0f32; BLOCK];
        expand_widened(w, v, &mut acc);
        for (o, a) in d.iter_mut().zip(&acc) {
            *o += *a;
        }
    }
}

/// `acc += Σ_j v[j] · w[j]` over a widened block (one fused multiply-add per element and j).
#[inline]
fn expand_widened(w: &[[f32; BLOCK]], v: &[f32], acc: &mut [f32; BLOCK]) {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    {
        use std::arch::x86_64::*;
        // SAFETY: the cfg guarantees AVX2 and FMA; every load and store covers 8 of the 32 floats
        // of one block row or of acc, at offsets 0, 8, 16 and 24.
        unsafe {
            let mut a = [_mm256_setzero_ps(); BLOCK / 8];
            for (k, ak) in a.iter_mut().enumerate() {
                *ak = _mm256_loadu_ps(acc.as_ptr().add(k * 8));
            }
            for (wj, &c) in w.iter().zip(v) {
                let cv = _mm256_set1_ps(c);
                for (k, ak) in a.iter_mut().enumerate() {
                    *ak = _mm256_fmadd_ps(cv, _mm256_loadu_ps(wj.as_ptr().add(k * 8)), *ak);
                }
            }
            for (k, ak) in a.iter().enumerate() {
                _mm256_storeu_ps(acc.as_mut_ptr().add(k * 8), *ak);
            }
        }
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    for (wj, &c) in w.iter().zip(v) {
        for (a, wf) in acc.iter_mut().zip(wj) {
            *a = c.mul_add(*wf, *a);
        }
    }
}

/// `v = x · Aᵀ` for one row, f32.
fn shrink_f32(m: &LowRank, xr: &[f32], v: &mut [f32]) {
    let r = m.rank;
    v.iter_mut().for_each(|e| *e = 0.0);
    for (k, &xk) in xr.iter().enumerate().take(m.input) {
        for (vj, aj) in v.iter_mut().zip(&m.a_t[k * r..(k + 1) * r]) {
            *vj += xk * aj;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_explicit_low_rank_product_per_row() {
        // in 3, out 2, rank 2.
        let m = LowRank {
            rank: 2,
            input: 3,
            output: 2,
            a_t: vec![1., 0., 0., 1., 1., 1.],
            b_t: vec![1., 2., 3., 4.],
        };
        let x = vec![1., 2., 3., /* row 1 */ 5., 5., 5.];
        let mut y = vec![0f32; 2 * 3];
        let rows = vec![
            vec![Slot {
                module: &m,
                scale: 0.5,
                offset: 1,
            }],
            vec![],
        ];
        bgmv_add(&mut y, 3, &x, 3, &rows);
        // Row 0: v = x·Aᵀ = [1 + 3, 2 + 3] = [4, 5]; v·Bᵀ = [4·1 + 5·3, 4·2 + 5·4] = [19, 28]; ×0.5.
        assert_eq!(y, vec![0., 9.5, 14., 0., 0., 0.]);
    }

    use crate::ops::test_values as lcg;

    fn module(rank: usize, input: usize, output: usize, seed: u64) -> LowRank {
        LowRank {
            rank,
            input,
            output,
            a_t: lcg(input * rank, seed),
            b_t: lcg(rank * output, seed + 100),
        }
    }

    /// A batch mixing a shared module, distinct modules and bare rows, over two column slices:
    /// the quantized served op (with and without the base's quantized activations) stays within
    /// int8 error of the f32 reference, and f32 modules through `lora_add` equal the reference.
    #[test]
    fn the_served_op_matches_the_f32_reference_for_shared_distinct_and_bare_rows() {
        let (input, out_a, out_b, n) = (96, 64, 32, 7);
        let out_total = out_a + out_b;
        let f32s: Vec<LowRank> = (0..3).map(|i| module(16, input, out_a, i)).collect();
        let small = module(8, input, out_b, 9);
        let served_f32: Vec<Module> = (0..3)
            .map(|i| Module::F32(module(16, input, out_a, i)))
            .collect();
        let served_q8: Vec<Module> = f32s
            .iter()
            .map(|m| Module::Q8(Q8LowRank::quantize(m).unwrap()))
            .collect();
        let small_q8 = Module::Q8(Q8LowRank::quantize(&small).unwrap());
        let small_f32 = Module::F32(module(8, input, out_b, 9));
        // Rows 0, 2, 5 share module 0; rows 1 and 4 have modules 1 and 2; 3 and 6 are bare. Row 2
        // also runs the small module on the second slice.
        let which = [Some(0), Some(1), Some(0), None, Some(2), Some(0), None];
        let x = lcg(n * input, 42);
        let base: Vec<f32> = lcg(n * out_total, 7);
        // (module, first column) per row; module 3 is the small one.
        let plan: Vec<Vec<(usize, usize)>> = which
            .iter()
            .enumerate()
            .map(|(t, w)| {
                let mut v: Vec<(usize, usize)> = w.map(|i| (i, 0)).into_iter().collect();
                if t == 2 {
                    v.push((3, out_a));
                }
                v
            })
            .collect();
        let reference = {
            let rows: Vec<Vec<Slot<'_>>> = plan
                .iter()
                .map(|p| {
                    p.iter()
                        .map(|&(i, offset)| Slot {
                            module: if i == 3 { &small } else { &f32s[i] },
                            scale: 1.5,
                            offset,
                        })
                        .collect()
                })
                .collect();
            let mut y = base.clone();
            bgmv_add(&mut y, out_total, &x, input, &rows);
            y
        };
        let slots = |mods: &[Module], sm: &Module| -> Vec<f32> {
            let rows: Vec<Vec<ModuleSlot<'_>>> = plan
                .iter()
                .map(|p| {
                    p.iter()
                        .map(|&(i, offset)| ModuleSlot {
                            module: if i == 3 { sm } else { &mods[i] },
                            scale: 1.5,
                            offset,
                        })
                        .collect()
                })
                .collect();
            let mut y = base.clone();
            lora_add(&mut y, out_total, &x, None, input, &rows).unwrap();
            let mut y2 = base.clone();
            let xq = QuantRows::new(&x, n, input);
            lora_add(&mut y2, out_total, &x, Some(&xq), input, &rows).unwrap();
            assert_eq!(y, y2, "quantizing per row or once gives the same bits");
            y
        };
        let exact = slots(&served_f32, &small_f32);
        for (a, b) in exact.iter().zip(&reference) {
            assert!((a - b).abs() < 1e-4, "f32 served {a} vs reference {b}");
        }
        let q8 = slots(&served_q8, &small_q8);
        // int8 error is relative to the size of the deltas, not to each (possibly cancelling) sum.
        let scale = reference
            .iter()
            .zip(&base)
            .map(|(r, b)| (r - b).abs())
            .fold(0f32, f32::max);
        let mut changed = 0;
        for (i, ((q, r), b)) in q8.iter().zip(&reference).zip(&base).enumerate() {
            assert!(
                (q - r).abs() < 0.01 * scale,
                "element {i}: q8 {q} vs f32 {r} (largest delta {scale})"
            );
            if (q - b).abs() > 1e-3 {
                changed += 1;
            }
        }
        // Bare rows are untouched; every adapted element moved.
        for t in [3usize, 6] {
            assert_eq!(
                &q8[t * out_total..(t + 1) * out_total],
                &base[t * out_total..(t + 1) * out_total]
            );
        }
        assert!(changed > 4 * out_a, "only {changed} elements changed");
    }

    /// 4-bit modules in a mixed batch: each row's delta tracks the f32 one within 4-bit error,
    /// bare rows are untouched, and quantizing x per row or once gives the same bits.
    #[test]
    fn four_bit_modules_serve_a_mixed_batch() {
        let (input, output, n) = (128, 64, 5);
        let f32s: Vec<LowRank> = (0..2).map(|i| module(16, input, output, 20 + i)).collect();
        let q4: Vec<Module> = f32s
            .iter()
            .map(|m| Module::Q4(Q4LowRank::quantize(m).unwrap()))
            .collect();
        let which = [Some(0), None, Some(1), Some(0), None];
        let x = lcg(n * input, 43);
        let base: Vec<f32> = lcg(n * output, 8);
        let reference = {
            let rows: Vec<Vec<Slot<'_>>> = which
                .iter()
                .map(|w| {
                    w.map(|i| Slot {
                        module: &f32s[i],
                        scale: 1.5,
                        offset: 0,
                    })
                    .into_iter()
                    .collect()
                })
                .collect();
            let mut y = base.clone();
            bgmv_add(&mut y, output, &x, input, &rows);
            y
        };
        let rows: Vec<Vec<ModuleSlot<'_>>> = which
            .iter()
            .map(|w| {
                w.map(|i| ModuleSlot {
                    module: &q4[i],
                    scale: 1.5,
                    offset: 0,
                })
                .into_iter()
                .collect()
            })
            .collect();
        let mut got = base.clone();
        lora_add(&mut got, output, &x, None, input, &rows).unwrap();
        let mut again = base.clone();
        let xq = QuantRows::new(&x, n, input);
        lora_add(&mut again, output, &x, Some(&xq), input, &rows).unwrap();
        assert_eq!(got, again);
        for (t, w) in which.iter().enumerate() {
            let span = t * output..(t + 1) * output;
            if w.is_none() {
                assert_eq!(&got[span.clone()], &base[span]);
                continue;
            }
            let delta = |y: &[f32]| -> Vec<f32> {
                y[span.clone()]
                    .iter()
                    .zip(&base[span.clone()])
                    .map(|(a, b)| a - b)
                    .collect()
            };
            let (d, want) = (delta(&got), delta(&reference));
            let norm = |v: &[f32]| v.iter().map(|e| e * e).sum::<f32>().sqrt();
            let err: Vec<f32> = d.iter().zip(&want).map(|(a, b)| a - b).collect();
            assert!(
                norm(&err) < 0.2 * norm(&want),
                "row {t}: 4-bit off by {} against a delta of {}",
                norm(&err),
                norm(&want)
            );
        }
    }

    /// A row's delta does not depend on which other rows share its module in the batch.
    #[test]
    fn a_rows_quantized_delta_is_independent_of_its_batch() {
        let (input, output, n) = (64, 96, 5);
        let q = Module::Q8(Q8LowRank::quantize(&module(16, input, output, 3)).unwrap());
        let x = lcg(n * input, 5);
        let all_rows: Vec<Vec<ModuleSlot<'_>>> = (0..n)
            .map(|_| {
                vec![ModuleSlot {
                    module: &q,
                    scale: 2.0,
                    offset: 0,
                }]
            })
            .collect();
        let mut together = vec![0f32; n * output];
        lora_add(&mut together, output, &x, None, input, &all_rows).unwrap();
        for t in 0..n {
            let mut alone = vec![0f32; output];
            lora_add(
                &mut alone,
                output,
                &x[t * input..(t + 1) * input],
                None,
                input,
                &all_rows[..1],
            )
            .unwrap();
            assert_eq!(alone, together[t * output..(t + 1) * output], "row {t}");
        }
    }

    #[test]
    fn a_module_that_does_not_fit_the_projection_is_an_error_not_a_skip() {
        let m = Module::F32(module(4, 64, 96, 1));
        let rows = vec![vec![ModuleSlot {
            module: &m,
            scale: 1.0,
            offset: 32,
        }]];
        let mut y = vec![0f32; 96];
        let err = lora_add(&mut y, 96, &lcg(64, 1), None, 64, &rows).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
        let err = lora_add(&mut y, 96, &lcg(60, 1), None, 64, &rows[..0]).unwrap_err();
        assert!(err.to_string().contains("inputs of width 64"), "{err}");
    }

    #[test]
    fn widths_that_are_not_whole_blocks_stay_f32() {
        assert!(Q8LowRank::quantize(&module(4, 48, 64, 1)).is_none());
        assert!(Q8LowRank::quantize(&module(4, 64, 40, 1)).is_none());
        let m = Module::F32(module(16, 64, 96, 1));
        assert!(m.to_q8().is_some_and(|q| q.bytes() * 3 < m.bytes()));
    }
}
