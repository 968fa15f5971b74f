// Rotary position embedding, in place, with per-token positions and the model's theta:
//   x (n, heads, head_dim); angle(p, i) = pos[p] * theta^(-2i / head_dim), i < head_dim / 2.
// `neox` pairs element i with i + head_dim/2 (GPT-NeoX / Hugging Face layout); otherwise adjacent
// elements 2i and 2i+1 are paired (the original / GGUF layout).
// grid (n, heads), block (head_dim / 2 rounded up to a multiple of 32).
#include "prelude.cuh"

namespace fw {

template <typename T>
__device__ void rope_impl(T* __restrict__ x, const int* __restrict__ pos, int n, int heads,
                          int head_dim, float theta, int neox) {
    const int p = blockIdx.x, h = blockIdx.y, i = threadIdx.x;
    const int half_dim = head_dim / 2;
    if (p >= n || h >= heads || i >= half_dim) return;
    const float freq = powf(theta, -2.0f * (float)i / (float)head_dim);
    float s, c;
    sincosf((float)pos[p] * freq, &s, &c);
    T* v = x + ((size_t)p * heads + h) * head_dim;
    const int i0 = neox ? i : 2 * i;
    const int i1 = neox ? i + half_dim : 2 * i + 1;
    const float a = to_f32(v[i0]), b = to_f32(v[i1]);
    v[i0] = from_f32<T>(a * c - b * s);
    v[i1] = from_f32<T>(a * s + b * c);
}

}  // namespace fw

#define FW_ROPE(SUFFIX, T)                                                                      \
    extern "C" __global__ void __launch_bounds__(128)                                           \
        rope_##SUFFIX(T* x, const int* pos, int n, int heads, int head_dim, float theta,        \
                      int neox) {                                                                \
        fw::rope_impl<T>(x, pos, n, heads, head_dim, theta, neox);                              \
    }

FW_ROPE(f16, __half)
FW_ROPE(bf16, __nv_bfloat16)
