// Matrix-vector products that dequantize GGML weight blocks on the fly, for the formats the CPU
// path serves (Q8_0, Q4_1): y[r] = sum_c W[r, c] * x[c], accumulated in f32.
//   Q8_0 block (34 bytes): f16 scale d, 32 int8 q;           w = d * q
//   Q4_1 block (20 bytes): f16 scale d, f16 min m, 16 bytes;  w_j = d * (q_j & 15) + m for the
//                          first 16 values, d * (q_j >> 4) + m for the next 16.
// W is row-major in blocks (rows, cols / 32). grid (ceil(rows / warps)), block (warps * 32): one
// warp per output row, lanes over the row's blocks.
#include "prelude.cuh"

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

template <typename B, typename T>
__device__ void qmatvec_impl(const B* __restrict__ w, const T* __restrict__ x, T* __restrict__ y,
                             int rows, int cols) {
    const int row = blockIdx.x * (blockDim.x / FW_WARP) + threadIdx.x / FW_WARP;
    const int lane = threadIdx.x % FW_WARP;
    if (row >= rows) return;
    const int nb = cols / 32;
    const B* wr = w + (size_t)row * nb;
    float acc = 0.0f;
    for (int b = lane; b < nb; b += FW_WARP) acc += block_dot(wr[b], x + (size_t)b * 32);
    acc = warp_sum(acc);
    if (lane == 0) y[row] = from_f32<T>(acc);
}

}  // namespace fw

#define FW_QMATVEC(FORMAT, BLOCK, SUFFIX, T)                                                    \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        FORMAT##_matvec_##SUFFIX(const void* w, const T* x, T* y, int rows, int cols) {         \
        fw::qmatvec_impl<fw::BLOCK, T>(static_cast<const fw::BLOCK*>(w), x, y, rows, cols);     \
    }

FW_QMATVEC(q8_0, BlockQ8_0, f16, __half)
FW_QMATVEC(q8_0, BlockQ8_0, bf16, __nv_bfloat16)
FW_QMATVEC(q4_1, BlockQ4_1, f16, __half)
FW_QMATVEC(q4_1, BlockQ4_1, bf16, __nv_bfloat16)
