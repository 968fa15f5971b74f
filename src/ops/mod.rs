//! Tensor ops the engine composes its model from: RMS norm, rotary embeddings and the fused
//! SiLU-gate here, the same steps on flat rows (`rows`, what the CPU forward pass runs), batched
//! Q8_0 products (`qgemm`), multi-adapter LoRA (`lora`, `q4`) and grouped-query attention
//! (`attention`). Training does not run through these: it has its own
//! forward and backward passes on flat f32 rows (`grad`), since candle's fused ops carry no
//! gradient. The same ops on an accelerator are `device::Kernels` (the kernels of
//! `kernels/*.cu`), which the engine's device forward pass (`engine::gpu`) composes.

pub mod amx;
pub mod attention;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod grad;
pub mod lora;
pub mod memory;
pub mod q4;
pub mod qgemm;
pub mod qgemm_amx;
pub mod rows;
pub mod sgemm;

use candle_core::{Result, Tensor, D};

/// Opens the CUDA device a model's `device` setting names (`cuda` or `cuda:N`) with every kernel
/// loaded, or says in one log line why the model runs on the CPU instead.
#[cfg(feature = "cuda")]
pub fn open_cuda(model: &str, device: &str) -> Option<cuda::CudaDevice> {
    let ordinal = device.strip_prefix("cuda")?.trim_start_matches(':');
    let ordinal: usize = if ordinal.is_empty() {
        0
    } else {
        match ordinal.parse() {
            Ok(n) => n,
            Err(_) => {
                tracing::warn!(
                    model,
                    device,
                    "not a CUDA device name (cuda:N); the model runs on the CPU"
                );
                return None;
            }
        }
    };
    match cuda::CudaDevice::open(ordinal) {
        Ok(d) => {
            tracing::info!(
                model,
                ordinal,
                "the forward pass runs on CUDA device {ordinal}"
            );
            Some(d)
        }
        Err(e) => {
            tracing::warn!(model, ordinal, error = %e, "CUDA is not usable here; the model runs on the CPU");
            None
        }
    }
}

/// Root-mean-square norm over the last dimension, scaled by `weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (mean_sq + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(weight)
}

/// `silu(gate) * up` from candle's ops: the reference the fused kernels are checked against.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()?.mul(up)
}

/// `silu(gate) · up` for rows that hold `width` gate values then `width` up values (what the fused
/// gate/up projection writes): n × 2·width in, n × width into `out`. Vectorized
/// (`exp_nonpositive`), and spread over the worker pool for prefill-sized batches.
#[allow(unsafe_code)]
pub fn silu_mul_rows(gu: &[f32], width: usize, out: &mut [f32]) {
    let out = &mut out[..gu.len() / 2];
    if width == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    let wide = cpu::features().avx512f;
    let rows = |range: std::ops::Range<usize>, out: &mut [f32]| {
        let gu = &gu[range];
        #[cfg(target_arch = "x86_64")]
        if wide {
            // SAFETY: AVX-512F is present (checked above).
            unsafe { silu_mul_avx512(gu, width, out) };
            return;
        }
        silu_mul_flat(gu, width, out);
    };
    const ROWS_PER_TASK: usize = 16;
    let n = out.len() / width;
    if n <= ROWS_PER_TASK {
        rows(0..gu.len(), out);
        return;
    }
    let cells: Vec<std::sync::Mutex<&mut [f32]>> = out
        .chunks_mut(ROWS_PER_TASK * width)
        .map(std::sync::Mutex::new)
        .collect();
    candle_core::utils::barrier_pool().execute_chunked(cells.len(), |range| {
        for i in range {
            if let Ok(mut o) = cells[i].lock() {
                let first = i * ROWS_PER_TASK * 2 * width;
                rows(first..(first + o.len() * 2).min(gu.len()), &mut o);
            }
        }
    });
}

/// `silu_mul_rows`' arithmetic on whole rows: the same operations element by element wherever
/// the compiler puts them in vectors, so every vector width gives the same bits.
#[inline(always)]
fn silu_mul_flat(gu: &[f32], width: usize, out: &mut [f32]) {
    for (o, row) in out.chunks_exact_mut(width).zip(gu.chunks_exact(2 * width)) {
        let (gate, up) = row.split_at(width);
        for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
            let e = exp_nonpositive(-g.abs());
            let s = 1.0 / (1.0 + e);
            *o = g * if g >= 0.0 { s } else { e * s } * u;
        }
    }
}

/// `silu_mul_flat` compiled for sixteen-lane vectors.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(unsafe_code)]
unsafe fn silu_mul_avx512(gu: &[f32], width: usize, out: &mut [f32]) {
    silu_mul_flat(gu, width, out);
}

/// `e^x` for x ≤ 0 (a softmax's shifted scores, a sigmoid's `e^-|x|`), in plain arithmetic the
/// compiler turns into vector code (libm's `expf` is a scalar call): x = n·ln 2 + r with
/// |r| ≤ ln 2 / 2, e^r from its degree-6 Taylor polynomial (relative error below 1e-6), and 2^n
/// put straight into the exponent bits. Below -87 (where e^x leaves f32's normal range) it
/// returns e^-87.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    // ln 2 split in two, so n · LN2_HI is exact for the n that occur.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 0.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p: f32 = 1.0 / 720.0;
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p.mul_add(r, c);
    }
    // n is in -126..=0, so n + 127 is a valid biased exponent. Added to 2^23 it becomes the low
    // bits of the sum's representation, and shifted into the exponent field it is 2^n: no
    // float-to-int conversion, whose saturating `as` kept the loops around this scalar.
    let biased = (n + (127.0 + 8_388_608.0)).to_bits() << 23;
    p * f32::from_bits(biased)
}

/// How a model pairs the dimensions RoPE rotates together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (2i, 2i+1): GGUF's Llama layout (q/k rows are permuted at conversion).
    Interleaved,
    /// Halves (i, i + d/2): Hugging Face's `rotate_half`.
    Halves,
}

/// Rotary position embedding. `x`: (tokens, heads, head_dim); `cos`/`sin`: (tokens, head_dim/2),
/// already gathered for each token's position.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, style: RopeStyle) -> Result<Tensor> {
    let (n, h, d) = x.dims3()?;
    let half = d / 2;
    match style {
        RopeStyle::Interleaved => {
            let x = x.reshape((n, h, half, 2))?;
            let x0 = x.narrow(3, 0, 1)?;
            let x1 = x.narrow(3, 1, 1)?;
            let cos = cos.reshape((n, 1, half, 1))?;
            let sin = sin.reshape((n, 1, half, 1))?;
            let r0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
            let r1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
            Tensor::cat(&[r0, r1], 3)?.reshape((n, h, d))
        }
        RopeStyle::Halves => {
            let x0 = x.narrow(2, 0, half)?;
            let x1 = x.narrow(2, half, half)?;
            let cos = cos.reshape((n, 1, half))?;
            let sin = sin.reshape((n, 1, half))?;
            let r0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
            let r1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
            Tensor::cat(&[r0, r1], 2)
        }
    }
}

/// Deterministic values in [-1, 1) for the ops' unit tests.
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: u64) -> Vec<f32> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_softmax_exponential_is_within_a_millionth_of_libm() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -90.0 * i as f32 / 200_000.0;
            let (got, want) = (exp_nonpositive(x), x.exp());
            if x >= -87.0 {
                worst = worst.max((got - want).abs() / want);
            } else {
                assert!(got <= 1.7e-38, "e^{x} = {got}");
            }
        }
        assert!(worst < 1e-6, "relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }

    /// The fused rows against candle's `silu(gate) * up`, for one row and for many.
    #[test]
    fn the_fused_silu_mul_matches_candles_ops() {
        let (width, n) = (48, 40);
        let gu: Vec<f32> = test_values(n * 2 * width, 9)
            .iter()
            .map(|x| 12.0 * x)
            .collect();
        let t = Tensor::from_vec(gu.clone(), (n, 2 * width), &Device::Cpu).unwrap();
        let want: Vec<f32> = silu_mul(
            &t.narrow(1, 0, width).unwrap(),
            &t.narrow(1, width, width).unwrap(),
        )
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
        for rows in [1usize, n] {
            let mut got = vec![f32::NAN; rows * width];
            silu_mul_rows(&gu[..rows * 2 * width], width, &mut got);
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "{rows} rows, element {i}: {a} vs {b}"
                );
            }
        }
    }

    /// Sixteen-lane vectors give the fused rows the same bits as the build's own.
    #[cfg(target_arch = "x86_64")]
    #[test]
    #[allow(unsafe_code)]
    fn the_fused_silu_mul_has_the_same_bits_on_avx512() {
        if !cpu::features().avx512f {
            println!("SKIPPED: AVX-512F is not in use here (FLYWHEEL_NO_AVX512 or the CPU)");
            return;
        }
        // Widths with and without a remainder past whole vectors, values past the exponential's
        // range and around zero.
        for width in [48usize, 1536, 7] {
            let gu: Vec<f32> = test_values(3 * 2 * width, width as u64)
                .iter()
                .map(|x| 120.0 * x * x * x)
                .collect();
            let mut narrow = vec![f32::NAN; 3 * width];
            let mut wide = vec![f32::NAN; 3 * width];
            silu_mul_flat(&gu, width, &mut narrow);
            // SAFETY: AVX-512F is present (checked above).
            unsafe { silu_mul_avx512(&gu, width, &mut wide) };
            for (i, (a, b)) in wide.iter().zip(&narrow).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "width {width}, element {i}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn rms_norm_matches_the_formula() {
        let x = Tensor::new(&[[1f32, 2., 3., 4.]], &Device::Cpu).unwrap();
        let w = Tensor::new(&[1f32, 1., 2., 0.5], &Device::Cpu).unwrap();
        let y: Vec<f32> = rms_norm(&x, &w, 0.0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let rms = ((1. + 4. + 9. + 16.) / 4f32).sqrt();
        let want = [1. / rms, 2. / rms, 6. / rms, 2. / rms];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn rope_rotates_pairs_and_preserves_norm() {
        // One token, one head, d = 4; angle pi/2 for the first pair, 0 for the second.
        let x = Tensor::new(&[[[1f32, 2., 3., 4.]]], &Device::Cpu).unwrap();
        let cos = Tensor::new(&[[0f32, 1.]], &Device::Cpu).unwrap();
        let sin = Tensor::new(&[[1f32, 0.]], &Device::Cpu).unwrap();
        let y: Vec<f32> = rope(&x, &cos, &sin, RopeStyle::Interleaved)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(y, vec![-2., 1., 3., 4.]);
        let y: Vec<f32> = rope(&x, &cos, &sin, RopeStyle::Halves)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // Pairs are (x0, x2) and (x1, x3).
        assert_eq!(y, vec![-3., 2., 1., 4.]);
    }
}
