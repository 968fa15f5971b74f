// Matrix-vector products that dequantize GGML weight blocks on the fly, for the formats the CPU
// path serves (Q8_0, Q4_1): y[t, r] = sum_c W[r, c] * x[t, c] for each of n input rows t,
// accumulated in f32; `_logits` variants write f32 (the model's head). `get_rows` gathers whole
// dequantized rows (the token embedding): out[t] = W[ids[t]].
//   Q8_0 block (34 bytes): f16 scale d, 32 int8 q;           w = d * q
//   Q4_1 block (20 bytes): f16 scale d, f16 min m, 16 bytes;  w_j = d * (q_j & 15) + m for the
//                          first 16 values, d * (q_j >> 4) + m for the next 16.
// W is row-major in blocks (rows, cols / 32). matvec: grid (ceil(rows / warps), ceil(n /
// FW_QMV_ROWS)), block (warps * 32): one warp per output row and FW_QMV_ROWS input rows, lanes
// over the row's blocks, so a batch reads each weight once per FW_QMV_ROWS rows.
// get_rows: grid (n), block (threads over the row's columns).
#include "prelude.cuh"

#define FW_QMV_ROWS 8

namespace fw {

struct __align__(2) BlockQ8_0 {
    __half d;
    signed char qs[32];
};

struct __align__(2) BlockQ4_1 {
    __half d;
    __half m;
    unsigned char qs[16];
};

template <typename T>
__device__ __forceinline__ float block_dot(const BlockQ8_0& b, const T* x) {
    float s = 0.0f;
    for (int j = 0; j < 32; ++j) s += (float)b.qs[j] * to_f32(x[j]);
    return s * __half2float(b.d);
}

template <typename T>
__device__ __forceinline__ float block_dot(const BlockQ4_1& b, const T* x) {
    float s = 0.0f, xs = 0.0f;
    for (int j = 0; j < 16; ++j) {
        const float x0 = to_f32(x[j]), x1 = to_f32(x[j + 16]);
        s += (float)(b.qs[j] & 15) * x0 + (float)(b.qs[j] >> 4) * x1;
        xs += x0 + x1;
    }
    return s * __half2float(b.d) + xs * __half2float(b.m);
}

__device__ __forceinline__ float block_value(const BlockQ8_0& b, int j) {
    return (float)b.qs[j] * __half2float(b.d);
}

__device__ __forceinline__ float block_value(const BlockQ4_1& b, int j) {
    const int q = j < 16 ? (b.qs[j] & 15) : (b.qs[j - 16] >> 4);
    return (float)q * __half2float(b.d) + __half2float(b.m);
}

template <typename B, typename T, typename O>
__device__ void qmatvec_impl(const B* __restrict__ w, const T* __restrict__ x, O* __restrict__ y,
                             int rows, int cols, int n) {
    const int row = blockIdx.x * (blockDim.x / FW_WARP) + threadIdx.x / FW_WARP;
    const int t0 = blockIdx.y * FW_QMV_ROWS;
    const int lane = threadIdx.x % FW_WARP;
    if (row >= rows || t0 >= n) return;
    const int tn = min(FW_QMV_ROWS, n - t0);
    const int nb = cols / 32;
    const B* wr = w + (size_t)row * nb;
    const T* xt = x + (size_t)t0 * cols;
    // Each weight block is read once for up to FW_QMV_ROWS input rows.
    float acc[FW_QMV_ROWS];
FW_UNROLL
    for (int t = 0; t < FW_QMV_ROWS; ++t) acc[t] = 0.0f;
    for (int b = lane; b < nb; b += FW_WARP) {
        const B blk = wr[b];
FW_UNROLL
        for (int t = 0; t < FW_QMV_ROWS; ++t)
            if (t < tn) acc[t] += block_dot(blk, xt + (size_t)t * cols + (size_t)b * 32);
    }
FW_UNROLL
    for (int t = 0; t < FW_QMV_ROWS; ++t) {
        const float sum = warp_sum(acc[t]);
        if (lane == 0 && t < tn) y[(size_t)(t0 + t) * rows + row] = from_f32<O>(sum);
    }
}

template <typename B, typename T>
__device__ void get_rows_impl(const B* __restrict__ w, const int* __restrict__ ids,
                              T* __restrict__ out, int n, int cols) {
    const int t = blockIdx.x;
    if (t >= n) return;
    const B* wr = w + (size_t)ids[t] * (cols / 32);
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
        out[(size_t)t * cols + c] = from_f32<T>(block_value(wr[c / 32], c % 32));
}

}  // namespace fw

#define FW_QMATVEC(FORMAT, BLOCK, SUFFIX, T)                                                    \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        FORMAT##_matvec_##SUFFIX(const void* w, const T* x, T* y, int rows, int cols, int n) {  \
        fw::qmatvec_impl<fw::BLOCK, T, T>(static_cast<const fw::BLOCK*>(w), x, y, rows, cols,   \
                                          n);                                                   \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        FORMAT##_logits_##SUFFIX(const void* w, const T* x, float* y, int rows, int cols,       \
                                 int n) {                                                       \
        fw::qmatvec_impl<fw::BLOCK, T, float>(static_cast<const fw::BLOCK*>(w), x, y, rows,     \
                                              cols, n);                                         \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        FORMAT##_get_rows_##SUFFIX(const void* w, const int* ids, T* out, int n, int cols) {    \
        fw::get_rows_impl<fw::BLOCK, T>(static_cast<const fw::BLOCK*>(w), ids, out, n, cols);   \
    }

FW_QMATVEC(q8_0, BlockQ8_0, f16, __half)
FW_QMATVEC(q8_0, BlockQ8_0, bf16, __nv_bfloat16)
FW_QMATVEC(q4_1, BlockQ4_1, f16, __half)
FW_QMATVEC(q4_1, BlockQ4_1, bf16, __nv_bfloat16)
