// Multi-LoRA kernels (Punica/S-LoRA style): each row t of a batch carries its adapter slot a(t)
// (-1: no adapter). The base projection runs once for the whole batch; these add the low-rank
// deltas row by row without merging any adapter into the shared weights.
//
//   shrink:      v[t, j]  = sum_i x[t, i] * A[a(t), j, i]                     (v in f32)
//   expand_add:  y[t, off + o] += scale[a(t)] * sum_j v[t, j] * B[a(t), o, j]
//
// Layouts (row-major): x (T, in), A (slots, r, in), v (T, r), B (slots, n, r), y (T, y_stride).
// `bgmv` variants take one slot per row (decode); `sgmv` variants take segments of consecutive
// rows that share a slot (prefill): seg_start (S + 1), seg_slot (S).
#include "prelude.cuh"

namespace fw {

// One warp per (row, rank index): lanes stride over the input dimension.
template <typename T>
__device__ __forceinline__ void shrink_row(const T* __restrict__ x, const T* __restrict__ a_row,
                                           float* __restrict__ v_out, int in) {
    const int lane = threadIdx.x % FW_WARP;
    float acc = 0.0f;
    for (int i = lane; i < in; i += FW_WARP) acc += to_f32(x[i]) * to_f32(a_row[i]);
    acc = warp_sum(acc);
    if (lane == 0) *v_out = acc;
}

// grid (T, ceil(r / warps)), block (warps * 32).
template <typename T>
__device__ void lora_shrink_bgmv_impl(const T* __restrict__ x, const T* __restrict__ A,
                                      const int* __restrict__ slot, float* __restrict__ v, int rows,
                                      int in, int r, int slots) {
    const int t = blockIdx.x;
    const int j = blockIdx.y * (blockDim.x / FW_WARP) + threadIdx.x / FW_WARP;
    if (t >= rows || j >= r) return;
    const int a = slot[t];
    if (a < 0 || a >= slots) {
        if (threadIdx.x % FW_WARP == 0) v[(size_t)t * r + j] = 0.0f;
        return;
    }
    shrink_row(x + (size_t)t * in, A + ((size_t)a * r + j) * in, v + (size_t)t * r + j, in);
}

// grid (S, ceil(r / warps)), block (warps * 32): each warp walks its segment's rows for one rank
// index, so the adapter row A[a, j, :] is read from cache after the first row.
template <typename T>
__device__ void lora_shrink_sgmv_impl(const T* __restrict__ x, const T* __restrict__ A,
                                      const int* __restrict__ seg_start,
                                      const int* __restrict__ seg_slot, float* __restrict__ v,
                                      int segments, int in, int r, int slots) {
    const int s = blockIdx.x;
    const int j = blockIdx.y * (blockDim.x / FW_WARP) + threadIdx.x / FW_WARP;
    if (s >= segments || j >= r) return;
    const int a = seg_slot[s];
    for (int t = seg_start[s]; t < seg_start[s + 1]; ++t) {
        if (a < 0 || a >= slots) {
            if (threadIdx.x % FW_WARP == 0) v[(size_t)t * r + j] = 0.0f;
            continue;
        }
        shrink_row(x + (size_t)t * in, A + ((size_t)a * r + j) * in, v + (size_t)t * r + j, in);
    }
}

#define FW_MAX_RANK 64

// grid (T, ceil(n / block)), block (threads): one thread per output column; the row's v is staged
// in shared memory. Rows without an adapter are left untouched.
template <typename T>
__device__ void lora_expand_add_impl(const float* __restrict__ v, const T* __restrict__ B,
                                     const int* __restrict__ slot, const float* __restrict__ scale,
                                     T* __restrict__ y, int rows, int r, int n, int y_stride,
                                     int y_offset, int slots) {
    __shared__ float vs[FW_MAX_RANK];
    const int t = blockIdx.x;
    if (t >= rows) return;
    const int a = slot[t];
    if (a < 0 || a >= slots || r > FW_MAX_RANK) return;
    for (int j = threadIdx.x; j < r; j += blockDim.x) vs[j] = v[(size_t)t * r + j];
    __syncthreads();
    const int o = blockIdx.y * blockDim.x + threadIdx.x;
    if (o >= n) return;
    const T* b_row = B + ((size_t)a * n + o) * r;
    float acc = 0.0f;
    for (int j = 0; j < r; ++j) acc += vs[j] * to_f32(b_row[j]);
    T* dst = y + (size_t)t * y_stride + y_offset + o;
    *dst = from_f32<T>(to_f32(*dst) + scale[a] * acc);
}

}  // namespace fw

#define FW_SHRINK_BGMV(SUFFIX, T)                                                               \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        lora_shrink_bgmv_##SUFFIX(const T* x, const T* A, const int* slot, float* v, int rows, \
                                  int in, int r, int slots) {                                   \
        fw::lora_shrink_bgmv_impl<T>(x, A, slot, v, rows, in, r, slots);                        \
    }
#define FW_SHRINK_SGMV(SUFFIX, T)                                                               \
    extern "C" __global__ void __launch_bounds__(256) lora_shrink_sgmv_##SUFFIX(                \
        const T* x, const T* A, const int* seg_start, const int* seg_slot, float* v,            \
        int segments, int in, int r, int slots) {                                                \
        fw::lora_shrink_sgmv_impl<T>(x, A, seg_start, seg_slot, v, segments, in, r, slots);     \
    }
#define FW_EXPAND_ADD(SUFFIX, T)                                                                \
    extern "C" __global__ void __launch_bounds__(256) lora_expand_add_##SUFFIX(                 \
        const float* v, const T* B, const int* slot, const float* scale, T* y, int rows, int r, \
        int n, int y_stride, int y_offset, int slots) {                                          \
        fw::lora_expand_add_impl<T>(v, B, slot, scale, y, rows, r, n, y_stride, y_offset,       \
                                    slots);                                                      \
    }

FW_SHRINK_BGMV(f16, __half)
FW_SHRINK_BGMV(bf16, __nv_bfloat16)
FW_SHRINK_SGMV(f16, __half)
FW_SHRINK_SGMV(bf16, __nv_bfloat16)
FW_EXPAND_ADD(f16, __half)
FW_EXPAND_ADD(bf16, __nv_bfloat16)
