//! f32 matrix products on plain slices through the `gemm` crate (the kernels candle's CPU matmul
//! calls, AVX-512 where the CPU has it): any operand may be a strided view (a transpose, a band of
//! columns) and the product may be added into its destination in place. Training's LoRA branches
//! use this for their thin rank-r products, whose outputs go straight into a wider activation's
//! columns or into the gradient vector; through candle each was a fresh zeroed tensor, a copy and
//! an add.
#![allow(unsafe_code)]

/// A read-only `rows` × `cols` matrix inside a slice: element (i, j) is at `i · rs + j · cs`.
#[derive(Clone, Copy)]
pub struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    /// A row-major matrix: `data` holds at least `rows · cols` values.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The same values read as the transpose.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Columns `start..start + width`.
    pub fn columns(self, start: usize, width: usize) -> Self {
        let offset = (start * self.cs).min(self.data.len());
        Self {
            data: &self.data[offset..],
            cols: width.min(self.cols.saturating_sub(start)),
            ..self
        }
    }

    /// Whether every element lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// Why a product was refused: its shapes do not chain or a view reaches past its slice.
#[derive(Debug, thiserror::Error)]
#[error("matrix product of {lhs:?} by {rhs:?} into {dst:?}: shapes do not match their buffers")]
pub struct ShapeError {
    lhs: (usize, usize),
    rhs: (usize, usize),
    dst: (usize, usize),
}

/// `dst = scale · a · b`, or `dst += scale · a · b` when `accumulate`. dst is the m × n matrix
/// whose row i starts at `dst[i · dst_rs]` (so a band of a wider matrix's columns may be written
/// in place), with m = a's rows, n = b's columns.
pub fn matmul(
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    scale: f32,
    a: View<'_>,
    b: View<'_>,
) -> Result<(), ShapeError> {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    let dst_ok = m == 0 || n == 0 || ((m == 1 || dst_rs >= n) && (m - 1) * dst_rs + n <= dst.len());
    if b.rows != k || !a.in_bounds() || !b.in_bounds() || !dst_ok {
        return Err(ShapeError {
            lhs: (a.rows, a.cols),
            rhs: (b.rows, b.cols),
            dst: (m, n),
        });
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(0.0);
            }
        }
        return Ok(());
    }
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 && m * n * k >= 1 << 16 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every element gemm reads lies inside `a.data` and `b.data`, and every element it
    // writes (rows of n values, dst_rs ≥ n apart) inside `dst`: checked above. `dst` is borrowed
    // mutably, so it cannot overlap the operands; rows of dst do not overlap each other
    // (dst_rs ≥ n). Strides are at most a slice's length, so they fit in isize.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

/// `scale · a · b` as a fresh row-major m × n vector.
pub fn product(scale: f32, a: View<'_>, b: View<'_>) -> Result<Vec<f32>, ShapeError> {
    let mut out = vec![0f32; a.rows * b.cols];
    matmul(&mut out, b.cols, false, scale, a, b)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: View<'_>, b: View<'_>) -> Vec<f32> {
        let mut out = vec![0f32; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                out[i * b.cols + j] = (0..a.cols)
                    .map(|p| a.data[i * a.rs + p * a.cs] * b.data[p * b.rs + j * b.cs])
                    .sum();
            }
        }
        out
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 16) as f32 / 65536.0
                    - 0.5
            })
            .collect()
    }

    fn close(x: &[f32], y: &[f32]) {
        assert_eq!(x.len(), y.len());
        for (i, (a, b)) in x.iter().zip(y).enumerate() {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{i}: {a} vs {b}");
        }
    }

    #[test]
    fn transposed_and_banded_views_match_the_naive_product() {
        // (n, inputs) · Aᵀ with A (rank, inputs), as a LoRA branch's first product.
        let (n, inputs, rank, wide) = (37, 70, 16, 90);
        let x = values(n * inputs, 1);
        let a = values(rank * inputs, 2);
        let xa = View::rows(&x, n, inputs);
        let at = View::rows(&a, rank, inputs).t();
        close(&product(1.0, xa, at).unwrap(), &naive(xa, at));

        // A band of a wider matrix's columns, read transposed: dyᵀ over columns 10..50.
        let dy = values(n * wide, 3);
        let band = View::rows(&dy, n, wide).columns(10, 40);
        let u = values(n * rank, 4);
        let uv = View::rows(&u, n, rank);
        close(&product(1.0, band.t(), uv).unwrap(), &naive(band.t(), uv));

        // Accumulated, scaled, into columns 20..36 of a 90-wide destination.
        let b = values(rank * rank, 5);
        let bv = View::rows(&b, rank, rank);
        let mut dst = values(n * wide, 6);
        let before = dst.clone();
        matmul(&mut dst[20..], wide, true, 0.5, uv, bv).unwrap();
        let want = naive(uv, bv);
        for i in 0..n {
            for j in 0..wide {
                let expect = if (20..36).contains(&j) {
                    before[i * wide + j] + 0.5 * want[i * rank + j - 20]
                } else {
                    before[i * wide + j]
                };
                let got = dst[i * wide + j];
                assert!(
                    (got - expect).abs() <= 1e-4,
                    "({i}, {j}): {got} vs {expect}"
                );
            }
        }
    }

    #[test]
    fn shapes_that_do_not_fit_are_refused() {
        let x = values(12, 1);
        let a = View::rows(&x, 3, 4);
        // Inner dimensions differ.
        assert!(product(1.0, a, a).is_err());
        // The destination is too short.
        let mut dst = vec![0f32; 8];
        assert!(matmul(&mut dst, 3, false, 1.0, a, a.t()).is_err());
        // A view that claims more rows than its slice holds.
        let long = View::rows(&x, 4, 4);
        assert!(product(1.0, long, a.t()).is_err());
        // k = 0 gives zeros, not an error.
        let empty = View::rows(&[], 3, 0);
        let none = View::rows(&[], 0, 2);
        assert_eq!(product(1.0, empty, none).unwrap(), vec![0.0; 6]);
    }
}
