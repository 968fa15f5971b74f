// SwiGLU activation on a fused gate/up projection: gu (rows, 2 * ffn) holds gate then up;
//   out[r, i] = silu(gu[r, i]) * gu[r, ffn + i],  silu(g) = g / (1 + exp(-g)).
// grid (ceil(rows * ffn / block)), block (threads).
#include "prelude.cuh"

namespace fw {

template <typename T>
__device__ void silu_mul_impl(const T* __restrict__ gu, T* __restrict__ out, int rows, int ffn) {
    const size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= (size_t)rows * ffn) return;
    const size_t r = k / ffn, i = k % ffn;
    const float g = to_f32(gu[r * 2 * ffn + i]);
    const float u = to_f32(gu[r * 2 * ffn + ffn + i]);
    out[k] = from_f32<T>(g / (1.0f + expf(-g)) * u);
}

}  // namespace fw

#define FW_SILU_MUL(SUFFIX, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        silu_mul_##SUFFIX(const T* gu, T* out, int rows, int ffn) {                             \
        fw::silu_mul_impl<T>(gu, out, rows, ffn);                                               \
    }

FW_SILU_MUL(f16, __half)
FW_SILU_MUL(bf16, __nv_bfloat16)

// Row gather: out[t] = x[idx[t]] for rows of `dim` (the last token of each sequence, before the
// final norm and the head). grid (n), block (threads over the row).
namespace fw {

template <typename T>
__device__ void gather_rows_impl(const T* __restrict__ x, const int* __restrict__ idx,
                                 T* __restrict__ out, int n, int dim) {
    const int t = blockIdx.x;
    if (t >= n) return;
    const T* src = x + (size_t)idx[t] * dim;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) out[(size_t)t * dim + c] = src[c];
}

}  // namespace fw

#define FW_GATHER_ROWS(SUFFIX, T)                                                               \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        gather_rows_##SUFFIX(const T* x, const int* idx, T* out, int n, int dim) {              \
        fw::gather_rows_impl<T>(x, idx, out, n, dim);                                           \
    }

FW_GATHER_ROWS(f16, __half)
FW_GATHER_ROWS(bf16, __nv_bfloat16)
