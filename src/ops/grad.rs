//! Forward and backward passes of the pointwise and row-wise ops LoRA training needs, on flat f32
//! rows. candle's fused `rms_norm`, `softmax_last_dim` and `rope` carry no gradient, and its
//! autograd would also compute gradients for the frozen base weights of every matmul; training
//! (`flywheel::train`) therefore runs its own backward pass and uses these.
//!
//! Every backward here is checked against central finite differences in the tests below.

use super::exp_nonpositive;

/// Runs `f(row_index, row)` over the `row_len`-wide rows of `data` on all cores.
pub fn par_rows<F>(data: &mut [f32], row_len: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    if row_len == 0 || data.is_empty() {
        return;
    }
    let rows = data.len() / row_len;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(rows.max(1));
    if threads <= 1 || data.len() < 1 << 14 {
        for (i, row) in data.chunks_mut(row_len).enumerate() {
            f(i, row);
        }
        return;
    }
    let per = rows.div_ceil(threads);
    let f = &f;
    std::thread::scope(|s| {
        for (c, chunk) in data.chunks_mut(per * row_len).enumerate() {
            s.spawn(move || {
                for (i, row) in chunk.chunks_mut(row_len).enumerate() {
                    f(c * per + i, row);
                }
            });
        }
    });
}

/// `y = w ⊙ x / rms(x)` per row of width `w.len()`; also returns each row's `1 / rms`.
pub fn rms_norm_fwd(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let d = w.len();
    let rstd: Vec<f32> = x
        .chunks(d)
        .map(|r| {
            let ms = r.iter().map(|v| v * v).sum::<f32>() / d as f32;
            1.0 / (ms + eps).sqrt()
        })
        .collect();
    let mut y = x.to_vec();
    par_rows(&mut y, d, |i, row| {
        let s = rstd[i];
        row.iter_mut().zip(w).for_each(|(v, w)| *v *= s * w);
    });
    (y, rstd)
}

/// The input gradient of [`rms_norm_fwd`] (the norm weight is frozen):
/// `dx = r·w⊙dy − r³·x·mean(w⊙dy⊙x)`.
pub fn rms_norm_bwd(dy: &[f32], x: &[f32], w: &[f32], rstd: &[f32]) -> Vec<f32> {
    let d = w.len();
    let mut dx = dy.to_vec();
    par_rows(&mut dx, d, |i, row| {
        let xr = &x[i * d..(i + 1) * d];
        let r = rstd[i];
        let dot: f32 = row
            .iter()
            .zip(w)
            .zip(xr)
            .map(|((g, w), x)| g * w * x)
            .sum::<f32>()
            / d as f32;
        let c = r * r * r * dot;
        for ((g, w), x) in row.iter_mut().zip(w).zip(xr) {
            *g = r * w * *g - c * x;
        }
    });
    dx
}

/// Rotary embedding in Hugging Face's half-split layout, in place. `x`: (tokens, heads, head_dim);
/// `cos`/`sin`: (tokens, head_dim / 2) for each token's position. `inverse` rotates backwards,
/// which is the backward pass of the rotation.
pub fn rope_halves(
    x: &mut [f32],
    heads: usize,
    head_dim: usize,
    cos: &[f32],
    sin: &[f32],
    inverse: bool,
) {
    let half = head_dim / 2;
    let sign = if inverse { -1.0 } else { 1.0 };
    let width = heads * head_dim;
    par_rows(x, width, |t, row| {
        let c = &cos[t * half..(t + 1) * half];
        let s = &sin[t * half..(t + 1) * half];
        for head in row.chunks_mut(head_dim) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x0, x1) = (a[i], b[i]);
                let si = sign * s[i];
                a[i] = x0 * c[i] - x1 * si;
                b[i] = x1 * c[i] + x0 * si;
            }
        }
    });
}

/// Causal softmax over rows of `t` scores, in place, after scaling by `scale`. Rows come in blocks
/// of `t` per query head group: row r is query position `r % t` and sees columns `0..=r % t`.
pub fn causal_softmax_fwd(s: &mut [f32], t: usize, scale: f32) {
    par_rows(s, t, |r, row| {
        let q = r % t;
        let (seen, masked) = row.split_at_mut(q + 1);
        let max = seen
            .iter()
            .fold(f32::NEG_INFINITY, |m, v| m.max(*v * scale));
        // Two loops, so the exponentials are vector code (libm's `expf` is a scalar call).
        for v in seen.iter_mut() {
            *v = exp_nonpositive(*v * scale - max);
        }
        let inv = 1.0 / seen.iter().sum::<f32>();
        seen.iter_mut().for_each(|v| *v *= inv);
        masked.iter_mut().for_each(|v| *v = 0.0);
    });
}

/// The score gradient of [`causal_softmax_fwd`]: `ds = scale · p ⊙ (dp − Σ p⊙dp)`, in place over `dp`.
pub fn causal_softmax_bwd(p: &[f32], dp: &mut [f32], t: usize, scale: f32) {
    par_rows(dp, t, |r, row| {
        let pr = &p[r * t..(r + 1) * t];
        let dot: f32 = pr.iter().zip(row.iter()).map(|(p, g)| p * g).sum();
        for (g, p) in row.iter_mut().zip(pr) {
            *g = scale * p * (*g - dot);
        }
    });
}

/// `1 / (1 + e^-x)` from `e^-|x|` (which never overflows), in arithmetic the compiler vectorizes.
#[inline]
fn sigmoid(x: f32) -> f32 {
    let e = exp_nonpositive(-x.abs());
    let s = 1.0 / (1.0 + e);
    if x >= 0.0 {
        s
    } else {
        e * s
    }
}

/// `silu(gate) ⊙ up` over rows laid out `[gate | up]`, each half `width` wide (the gate and up
/// projections' shared output): (rows, width). The serving pass's `ops::silu_mul_rows`, into a
/// new vector.
pub fn silu_mul_fwd(gu: &[f32], width: usize) -> Vec<f32> {
    let mut out = vec![0f32; gu.len() / 2];
    super::silu_mul_rows(gu, width, &mut out);
    out
}

/// The gradient of [`silu_mul_fwd`] with respect to its `[gate | up]` rows, given the output's
/// gradient `da` (rows, width).
pub fn silu_mul_bwd(da: &[f32], gu: &[f32], width: usize) -> Vec<f32> {
    let mut dgu = vec![0f32; gu.len()];
    par_rows(&mut dgu, 2 * width, |r, d| {
        let (gate, up) = gu[2 * r * width..2 * (r + 1) * width].split_at(width);
        let da = &da[r * width..(r + 1) * width];
        let (dg, du) = d.split_at_mut(width);
        for ((((dg, du), g), u), a) in dg.iter_mut().zip(du).zip(gate).zip(up).zip(da) {
            let s = sigmoid(*g);
            *du = a * g * s;
            *dg = a * u * s * (1.0 + g * (1.0 - s));
        }
    });
    dgu
}

/// Cross-entropy of `targets` under rows of `logits` (each `vocab` wide). Returns the summed loss
/// and turns `logits` into its gradient scaled by `weight` (`(softmax − onehot) · weight`).
pub fn cross_entropy(logits: &mut [f32], vocab: usize, targets: &[u32], weight: f32) -> f64 {
    let losses = std::sync::Mutex::new(vec![0f64; targets.len()]);
    par_rows(logits, vocab, |r, row| {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
        for v in row.iter_mut() {
            *v = exp_nonpositive(*v - max);
        }
        let sum: f64 = row.iter().map(|&v| f64::from(v)).sum();
        let target = targets[r] as usize;
        let p_target = f64::from(row[target]) / sum;
        let inv = (1.0 / sum) as f32;
        row.iter_mut().for_each(|v| *v *= inv * weight);
        row[target] -= weight;
        if let Ok(mut l) = losses.lock() {
            l[r] = -p_target.max(f64::MIN_POSITIVE).ln();
        }
    });
    losses.into_inner().map_or(f64::NAN, |l| l.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Checks `grad` against central differences of `loss` at `x`, coordinate by coordinate.
    fn check(x: &[f32], grad: &[f32], loss: impl Fn(&[f32]) -> f64) {
        let h = 1e-2f32;
        for i in 0..x.len() {
            let mut p = x.to_vec();
            p[i] += h;
            let mut m = x.to_vec();
            m[i] -= h;
            let fd = (loss(&p) - loss(&m)) / (2.0 * f64::from(h));
            let g = f64::from(grad[i]);
            assert!(
                (fd - g).abs() <= 2e-3 + 2e-2 * fd.abs().max(g.abs()),
                "coordinate {i}: analytic {g}, finite difference {fd}"
            );
        }
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(a, b)| f64::from(a * b)).sum()
    }

    #[test]
    fn rms_norm_gradient_matches_finite_differences() {
        let (rows, d) = (3, 8);
        let x = lcg(rows * d, 1);
        let w: Vec<f32> = lcg(d, 2).iter().map(|v| 1.0 + v).collect();
        let r = lcg(rows * d, 3);
        let (_, rstd) = rms_norm_fwd(&x, &w, 1e-5);
        let dx = rms_norm_bwd(&r, &x, &w, &rstd);
        check(&x, &dx, |x| dot(&rms_norm_fwd(x, &w, 1e-5).0, &r));
    }

    #[test]
    fn rope_gradient_is_the_inverse_rotation() {
        let (t, heads, hd) = (3, 2, 8);
        let x = lcg(t * heads * hd, 4);
        let angles: Vec<f32> = lcg(t * hd / 2, 5).iter().map(|a| a * 3.0).collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        let r = lcg(x.len(), 6);
        let mut dx = r.clone();
        rope_halves(&mut dx, heads, hd, &cos, &sin, true);
        check(&x, &dx, |x| {
            let mut y = x.to_vec();
            rope_halves(&mut y, heads, hd, &cos, &sin, false);
            dot(&y, &r)
        });
        // Forward then inverse is the identity.
        let mut y = x.clone();
        rope_halves(&mut y, heads, hd, &cos, &sin, false);
        rope_halves(&mut y, heads, hd, &cos, &sin, true);
        assert!(y.iter().zip(&x).all(|(a, b)| (a - b).abs() < 1e-5));
    }

    #[test]
    fn causal_softmax_masks_the_future_and_its_gradient_matches() {
        let t = 4;
        let groups = 2;
        let s = lcg(groups * t * t, 7);
        let mut p = s.clone();
        causal_softmax_fwd(&mut p, t, 0.5);
        for (r, row) in p.chunks(t).enumerate() {
            let q = r % t;
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            assert!(row[q + 1..].iter().all(|v| *v == 0.0));
        }
        let r = lcg(s.len(), 8);
        let mut ds = r.clone();
        causal_softmax_bwd(&p, &mut ds, t, 0.5);
        check(&s, &ds, |s| {
            let mut p = s.to_vec();
            causal_softmax_fwd(&mut p, t, 0.5);
            dot(&p, &r)
        });
    }

    #[test]
    fn silu_mul_gradients_match_finite_differences() {
        let g: Vec<f32> = lcg(16, 9).iter().map(|v| v * 4.0).collect();
        let u = lcg(16, 10);
        let r = lcg(16, 11);
        // Two rows of [gate | up], 8 wide.
        let gu = |g: &[f32], u: &[f32]| {
            let mut out = Vec::new();
            for (g, u) in g.chunks(8).zip(u.chunks(8)) {
                out.extend_from_slice(g);
                out.extend_from_slice(u);
            }
            out
        };
        let dgu = silu_mul_bwd(&r, &gu(&g, &u), 8);
        let dg: Vec<f32> = dgu.chunks(8).step_by(2).flatten().copied().collect();
        let du: Vec<f32> = dgu
            .chunks(8)
            .skip(1)
            .step_by(2)
            .flatten()
            .copied()
            .collect();
        check(&g, &dg, |g| dot(&silu_mul_fwd(&gu(g, &u), 8), &r));
        check(&u, &du, |u| dot(&silu_mul_fwd(&gu(&g, u), 8), &r));
    }

    #[test]
    fn cross_entropy_gradient_matches_finite_differences() {
        let vocab = 7;
        let logits: Vec<f32> = lcg(3 * vocab, 12).iter().map(|v| v * 3.0).collect();
        let targets = [2u32, 0, 6];
        let mut grad = logits.clone();
        let loss = cross_entropy(&mut grad, vocab, &targets, 0.5);
        assert!(loss > 0.0);
        check(&logits, &grad, |l| {
            let mut l = l.to_vec();
            0.5 * cross_entropy(&mut l, vocab, &targets, 1.0)
        });
    }
}
