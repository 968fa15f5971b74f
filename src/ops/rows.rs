//! The engine's row-wise steps on flat f32 rows (RMS norm with the residual add before it, the
//! attention input's bias, head norms and rotary positions), spread over candle's worker pool a
//! few rows per task. The CPU forward pass keeps its activations in plain vectors between the
//! products: before, each of these steps was a handful of candle tensor ops, each a copy on one
//! core while the other waited (a third of a 256-token prefill on AMX tiles).

use super::RopeStyle;
use std::sync::Mutex;

/// Rows one pool task takes: small enough to share a prefill's rows out evenly, large enough that
/// a decode step of a few rows runs inline.
const ROWS_PER_TASK: usize = 8;

/// Runs `f(first_row, row_count, cell)` for each cell (the part of some buffers that covers
/// `ROWS_PER_TASK` rows, the last one fewer) on the worker pool; inline when there is one.
fn each_on_pool<C: Send>(cells: Vec<C>, f: impl Fn(usize, &mut C) + Sync) {
    if cells.len() <= 1 {
        for (i, mut c) in cells.into_iter().enumerate() {
            f(i * ROWS_PER_TASK, &mut c);
        }
        return;
    }
    let cells: Vec<Mutex<C>> = cells.into_iter().map(Mutex::new).collect();
    candle_core::utils::barrier_pool().execute_chunked(cells.len(), |range| {
        for i in range {
            if let Ok(mut c) = cells[i].lock() {
                f(i * ROWS_PER_TASK, &mut c);
            }
        }
    });
}

/// `out = w ⊙ x / rms(x)` for one row, with `(x · (1 / rms)) · w` in that order (as candle's ops
/// did it).
#[inline]
pub fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    // Sixteen partial sums, so the squares are summed in vector lanes.
    let mut lanes = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += v * v;
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    let sum = lanes.iter().sum::<f32>() + tail;
    let inv = 1.0 / (sum / x.len().max(1) as f32 + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * w;
    }
}

/// `x += delta` (when given), then `out = rms_norm(x) ⊙ w`, row by row (rows `w.len()` wide).
pub fn add_rms_norm(x: &mut [f32], delta: Option<&[f32]>, w: &[f32], eps: f32, out: &mut [f32]) {
    let width = w.len();
    if width == 0 {
        return;
    }
    let span = ROWS_PER_TASK * width;
    type Cell<'a> = (&'a mut [f32], &'a mut [f32], Option<&'a [f32]>);
    let cells: Vec<Cell<'_>> = x
        .chunks_mut(span)
        .zip(out.chunks_mut(span))
        .enumerate()
        .map(|(i, (x, o))| {
            let d = delta.map(|d| &d[(i * span).min(d.len())..((i + 1) * span).min(d.len())]);
            (x, o, d)
        })
        .collect();
    each_on_pool(cells, |_, (x, out, delta)| {
        if let Some(d) = delta {
            for (x, d) in x.iter_mut().zip(d.iter()) {
                *x += d;
            }
        }
        for (x, o) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
            rms_norm_row(x, w, eps, o);
        }
    });
}

/// What happens to the queries and keys between their projection and attention.
pub struct QkvShape<'a> {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Added to each projected row (Qwen2's q/k/v biases).
    pub bias: Option<&'a [f32]>,
    /// RMS norm weights over each query head and each key head (Qwen3), and its epsilon.
    pub head_norm: Option<(&'a [f32], &'a [f32])>,
    pub eps: f32,
    pub rope: RopeStyle,
    /// (positions, head_dim / 2) rotary angles' cosines and sines, and each row's position.
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    pub positions: &'a [u32],
}

impl QkvShape<'_> {
    fn q_width(&self) -> usize {
        self.heads * self.head_dim
    }

    fn width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }
}

/// Rows of a fused q/k/v projection, in place: the bias added, the query and key heads normed and
/// rotated to their positions; each row's queries are also copied to `q` (rows of heads ×
/// head_dim), the layout attention reads.
pub fn prepare_qkv(qkv: &mut [f32], q: &mut [f32], s: &QkvShape<'_>) {
    let (width, qw) = (s.width(), s.q_width());
    if width == 0 || qw == 0 {
        return;
    }
    let cells: Vec<(&mut [f32], &mut [f32])> = qkv
        .chunks_mut(ROWS_PER_TASK * width)
        .zip(q.chunks_mut(ROWS_PER_TASK * qw))
        .collect();
    let hd = s.head_dim;
    let kw = s.kv_heads * hd;
    each_on_pool(cells, |first, (rows, q)| {
        let mut normed = vec![0f32; hd];
        for (i, (row, q)) in rows
            .chunks_exact_mut(width)
            .zip(q.chunks_exact_mut(qw))
            .enumerate()
        {
            if let Some(b) = s.bias {
                for (x, b) in row.iter_mut().zip(b) {
                    *x += b;
                }
            }
            let half = hd / 2;
            let p = s.positions.get(first + i).copied().unwrap_or(0) as usize;
            let (cos, sin) = (&s.cos[p * half..][..half], &s.sin[p * half..][..half]);
            let (qs, rest) = row.split_at_mut(qw);
            let ks = &mut rest[..kw];
            for (heads, norm) in [
                (qs, s.head_norm.map(|n| n.0)),
                (ks, s.head_norm.map(|n| n.1)),
            ] {
                for head in heads.chunks_exact_mut(hd) {
                    if let Some(w) = norm {
                        rms_norm_row(head, w, s.eps, &mut normed);
                        head.copy_from_slice(&normed);
                    }
                    rope_head(head, cos, sin, s.rope);
                }
            }
            q.copy_from_slice(&row[..qw]);
        }
    });
}

/// Rotates one head to its position: pairs (2i, 2i + 1) or (i, i + d/2) by angle i.
#[inline]
fn rope_head(head: &mut [f32], cos: &[f32], sin: &[f32], style: RopeStyle) {
    let half = head.len() / 2;
    match style {
        RopeStyle::Interleaved => {
            for ((pair, &c), &s) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
                let (x0, x1) = (pair[0], pair[1]);
                pair[0] = x0 * c - x1 * s;
                pair[1] = x0 * s + x1 * c;
            }
        }
        RopeStyle::Halves => {
            let (a, b) = head.split_at_mut(half);
            for (((x0, x1), &c), &s) in a.iter_mut().zip(b.iter_mut()).zip(cos).zip(sin) {
                let (v0, v1) = (*x0, *x1);
                *x0 = v0 * c - v1 * s;
                *x1 = v0 * s + v1 * c;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_values;
    use candle_core::{Device, Tensor};

    fn tensor(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                "{what}, element {i}: {x} vs {y}"
            );
        }
    }

    /// The fused residual add and norm against candle's ops, for a decode-sized and a
    /// prefill-sized batch (inline and on the pool) and a width with a tail.
    #[test]
    fn the_residual_add_and_norm_match_candles_ops() {
        for (n, width) in [(1usize, 64usize), (3, 40), (37, 72)] {
            let x = test_values(n * width, 1);
            let d = test_values(n * width, 2);
            let w = test_values(width, 3);
            let sum: Vec<f32> = x.iter().zip(&d).map(|(a, b)| a + b).collect();
            let want = values(
                &crate::ops::rms_norm(&tensor(&sum, &[n, width]), &tensor(&w, &[width]), 1e-5)
                    .unwrap(),
            );
            let mut got_x = x.clone();
            let mut out = vec![0f32; n * width];
            add_rms_norm(&mut got_x, Some(&d), &w, 1e-5, &mut out);
            close(&got_x, &sum, "residual");
            close(&out, &want, "norm");
            let mut again = vec![0f32; n * width];
            add_rms_norm(&mut got_x, None, &w, 1e-5, &mut again);
            close(&again, &want, "norm without an add");
        }
    }

    /// Bias, head norms and both rotary layouts against candle's ops, on the pool.
    #[test]
    fn preparing_queries_and_keys_matches_candles_ops() {
        let (n, heads, kv_heads, hd) = (21usize, 4usize, 2usize, 8usize);
        let width = (heads + 2 * kv_heads) * hd;
        let half = hd / 2;
        let ctx = 32;
        let cos: Vec<f32> = (0..ctx * half).map(|i| (i as f32 * 0.1).cos()).collect();
        let sin: Vec<f32> = (0..ctx * half).map(|i| (i as f32 * 0.1).sin()).collect();
        let positions: Vec<u32> = (0..n as u32).map(|i| (i * 3 + 1) % ctx as u32).collect();
        let qkv = test_values(n * width, 4);
        let bias = test_values(width, 5);
        let (qn, kn) = (test_values(hd, 6), test_values(hd, 7));
        for style in [RopeStyle::Interleaved, RopeStyle::Halves] {
            for extras in [false, true] {
                let t = tensor(&qkv, &[n, width]);
                let t = if extras {
                    t.broadcast_add(&tensor(&bias, &[width])).unwrap()
                } else {
                    t
                };
                let q = t
                    .narrow(1, 0, heads * hd)
                    .unwrap()
                    .reshape((n, heads, hd))
                    .unwrap();
                let k = t
                    .narrow(1, heads * hd, kv_heads * hd)
                    .unwrap()
                    .reshape((n, kv_heads, hd))
                    .unwrap();
                let (q, k) = if extras {
                    (
                        crate::ops::rms_norm(&q, &tensor(&qn, &[hd]), 1e-6).unwrap(),
                        crate::ops::rms_norm(&k, &tensor(&kn, &[hd]), 1e-6).unwrap(),
                    )
                } else {
                    (q, k)
                };
                let pos = Tensor::from_vec(positions.clone(), n, &Device::Cpu).unwrap();
                let c = tensor(&cos, &[ctx, half]).index_select(&pos, 0).unwrap();
                let s = tensor(&sin, &[ctx, half]).index_select(&pos, 0).unwrap();
                let want_q = values(&crate::ops::rope(&q, &c, &s, style).unwrap());
                let want_k = values(&crate::ops::rope(&k, &c, &s, style).unwrap());

                let mut got = qkv.clone();
                let mut got_q = vec![0f32; n * heads * hd];
                let shape = QkvShape {
                    heads,
                    kv_heads,
                    head_dim: hd,
                    bias: extras.then_some(&bias[..]),
                    head_norm: extras.then_some((&qn[..], &kn[..])),
                    eps: 1e-6,
                    rope: style,
                    cos: &cos,
                    sin: &sin,
                    positions: &positions,
                };
                prepare_qkv(&mut got, &mut got_q, &shape);
                let what = format!("{style:?}, extras {extras}");
                close(&got_q, &want_q, &format!("{what}: queries"));
                let got_k: Vec<f32> = got
                    .chunks(width)
                    .flat_map(|r| r[heads * hd..(heads + kv_heads) * hd].to_vec())
                    .collect();
                close(&got_k, &want_k, &format!("{what}: keys"));
                // Values only take the bias.
                let got_v: Vec<f32> = got
                    .chunks(width)
                    .flat_map(|r| r[(heads + kv_heads) * hd..].to_vec())
                    .collect();
                let want_v: Vec<f32> = values(&t)
                    .chunks(width)
                    .flat_map(|r| r[(heads + kv_heads) * hd..].to_vec())
                    .collect();
                close(&got_v, &want_v, &format!("{what}: values"));
            }
        }
    }
}
