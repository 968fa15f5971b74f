// RMS norm over the last dimension, with an optional fused residual add:
//   h = x (+ residual);  residual_out = h (when given);  out = h / sqrt(mean(h^2) + eps) * w
// One block per row; the block size is a multiple of 32.
#include "prelude.cuh"

namespace fw {

template <typename T>
__device__ void rms_norm_impl(const T* __restrict__ x, const T* __restrict__ residual,
                              const T* __restrict__ w, T* __restrict__ out,
                              T* __restrict__ residual_out, int rows, int dim, float eps) {
    __shared__ float scratch[FW_WARP];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const T* xr = x + (size_t)row * dim;
    const T* rr = residual ? residual + (size_t)row * dim : nullptr;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float h = to_f32(xr[i]) + (rr ? to_f32(rr[i]) : 0.0f);
        ss += h * h;
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float h = to_f32(xr[i]) + (rr ? to_f32(rr[i]) : 0.0f);
        if (residual_out) residual_out[(size_t)row * dim + i] = from_f32<T>(h);
        out[(size_t)row * dim + i] = from_f32<T>(h * inv * to_f32(w[i]));
    }
}

}  // namespace fw

#define FW_RMS_NORM(SUFFIX, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(1024)                                          \
        rms_norm_##SUFFIX(const T* x, const T* residual, const T* w, T* out, T* residual_out,  \
                          int rows, int dim, float eps) {                                        \
        fw::rms_norm_impl<T>(x, residual, w, out, residual_out, rows, dim, eps);                \
    }

FW_RMS_NORM(f16, __half)
FW_RMS_NORM(bf16, __nv_bfloat16)
