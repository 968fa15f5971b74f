//! Batched multi-adapter LoRA on the CPU (BGMV): for each row t of a batch, with its own adapter
//! a(t) (or none), `y[t, off..off+n] += scale[a] · (x[t] · A[a]ᵀ) · B[a]ᵀ`. One pass over the rows,
//! no per-adapter tensor ops, so many distinct adapters in a batch cost about what one does.

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
}
