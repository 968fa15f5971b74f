// Rotary position embedding, in place, with per-token positions and the model's theta:
//   x (n, heads, head_dim); angle(p, i) = pos[p] * theta^(-2i / head_dim), i < head_dim / 2.
// `neox` pairs element i with i + head_dim/2 (GPT-NeoX / Hugging Face layout); otherwise adjacent
// elements 2i and 2i+1 are paired (the original / GGUF layout).
// grid (n, heads), block (head_dim / 2 rounded up to a multiple of 32).
#include "prelude.cuh"

namespace fw {

// Rotates pair i of the head at `src` by `angle` into `dst` (which may be `src`).
template <typename T>
__device__ __forceinline__ void rotate_pair(const T* src, T* dst, int i, int half_dim,
                                            float angle, int neox) {
    float s, c;
    sincosf(angle, &s, &c);
    const int i0 = neox ? i : 2 * i;
    const int i1 = neox ? i + half_dim : 2 * i + 1;
    const float a = to_f32(src[i0]), b = to_f32(src[i1]);
    dst[i0] = from_f32<T>(a * c - b * s);
    dst[i1] = from_f32<T>(a * s + b * c);
}

template <typename T>
__device__ void rope_impl(T* __restrict__ x, const int* __restrict__ pos, int n, int heads,
                          int head_dim, float theta, int neox) {
    const int p = blockIdx.x, h = blockIdx.y, i = threadIdx.x;
    const int half_dim = head_dim / 2;
    if (p >= n || h >= heads || i >= half_dim) return;
    const float freq = powf(theta, -2.0f * (float)i / (float)head_dim);
    T* v = x + ((size_t)p * heads + h) * head_dim;
    rotate_pair(v, v, i, half_dim, (float)pos[p] * freq, neox);
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

// The serving path's RoPE, fused with the KV cache write: from a fused projection qkv (n, (H + 2
// KVH) * D) it writes the rotated queries to q (n, H, D), and the rotated keys and the values to
// the paged caches (pages, block_size, KVH, D) at row slot[t] (page * block_size + offset).
// Angles use a frequency table inv_freq (D / 2), so every RoPE scaling (linear, Llama 3, per-
// frequency factors) is the host's business: angle(t, i) = pos[t] * inv_freq[i].
// grid (n, H + KVH), block (D / 2 rounded up to a multiple of 32).
namespace fw {

template <typename T>
__device__ void qkv_rope_cache_impl(const T* __restrict__ qkv, const int* __restrict__ pos,
                                    const float* __restrict__ inv_freq,
                                    const int* __restrict__ slot, T* __restrict__ q,
                                    T* __restrict__ k_cache, T* __restrict__ v_cache, int n,
                                    int heads, int kv_heads, int head_dim, int neox) {
    const int t = blockIdx.x, h = blockIdx.y, i = threadIdx.x;
    const int half_dim = head_dim / 2;
    if (t >= n || h >= heads + kv_heads || i >= half_dim) return;
    const size_t width = (size_t)(heads + 2 * kv_heads) * head_dim;
    const T* src = qkv + (size_t)t * width + (size_t)h * head_dim;
    T* dst;
    if (h < heads) {
        dst = q + ((size_t)t * heads + h) * head_dim;
    } else {
        const size_t row = ((size_t)slot[t] * kv_heads + (h - heads)) * head_dim;
        dst = k_cache + row;
        // The value head sits kv_heads heads after its key head; it is copied unrotated.
        const T* vs = src + (size_t)kv_heads * head_dim;
        v_cache[row + i] = vs[i];
        v_cache[row + i + half_dim] = vs[i + half_dim];
    }
    rotate_pair(src, dst, i, half_dim, (float)pos[t] * inv_freq[i], neox);
}

}  // namespace fw

#define FW_QKV_ROPE_CACHE(SUFFIX, T)                                                            \
    extern "C" __global__ void __launch_bounds__(128)                                           \
        qkv_rope_cache_##SUFFIX(const T* qkv, const int* pos, const float* inv_freq,            \
                                const int* slot, T* q, T* k_cache, T* v_cache, int n,           \
                                int heads, int kv_heads, int head_dim, int neox) {              \
        fw::qkv_rope_cache_impl<T>(qkv, pos, inv_freq, slot, q, k_cache, v_cache, n, heads,     \
                                   kv_heads, head_dim, neox);                                   \
    }

FW_QKV_ROPE_CACHE(f16, __half)
FW_QKV_ROPE_CACHE(bf16, __nv_bfloat16)
