// Decode attention over a paged KV cache, grouped-query: one query token per sequence.
//   q (S, H, D); k_cache, v_cache (blocks, block_size, KVH, D); block_table (S, max_blocks);
//   seq_lens (S); out (S, H, D). Head h reads kv head h / (H / KVH).
// grid (S, H), block (128: the output dimensions are spread as d = k * 128 + thread). Positions go in tiles of FW_ATTN_TILE with an online softmax (running
// max and sum, rescaled per tile): a warp scores each position (lanes over D), then each thread
// accumulates one output dimension. D is at most FW_ATTN_MAX_D.
#include "prelude.cuh"

#define FW_ATTN_TILE 128
#define FW_ATTN_MAX_D 256

namespace fw {

template <typename T>
__device__ void paged_decode_attention_impl(const T* __restrict__ q, const T* __restrict__ k_cache,
                                            const T* __restrict__ v_cache,
                                            const int* __restrict__ block_table,
                                            const int* __restrict__ seq_lens, T* __restrict__ out,
                                            int seqs, int heads, int kv_heads, int head_dim,
                                            int block_size, int max_blocks, float scale) {
    __shared__ float q_s[FW_ATTN_MAX_D];
    __shared__ float scores[FW_ATTN_TILE];
    __shared__ float scratch[FW_WARP];
    const int s = blockIdx.x, h = blockIdx.y;
    if (s >= seqs || h >= heads || head_dim > FW_ATTN_MAX_D) return;
    const int g = h / (heads / kv_heads);
    const int len = seq_lens[s];
    const int lane = threadIdx.x % FW_WARP, warp = threadIdx.x / FW_WARP;
    const int warps = blockDim.x / FW_WARP;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x)
        q_s[d] = to_f32(q[((size_t)s * heads + h) * head_dim + d]);
    __syncthreads();
    // Running softmax state (identical in every thread) and this thread's output dimensions.
    float m = -INFINITY, l = 0.0f;
    float acc[FW_ATTN_MAX_D / 128];
    for (int k = 0; k < FW_ATTN_MAX_D / 128; ++k) acc[k] = 0.0f;
    for (int start = 0; start < len; start += FW_ATTN_TILE) {
        const int n = min(FW_ATTN_TILE, len - start);
        for (int p = warp; p < n; p += warps) {
            const int pos = start + p;
            const int blk = block_table[(size_t)s * max_blocks + pos / block_size];
            const T* kr = k_cache + (((size_t)blk * block_size + pos % block_size) * kv_heads + g) *
                                        head_dim;
            float dot = 0.0f;
            for (int d = lane; d < head_dim; d += FW_WARP) dot += q_s[d] * to_f32(kr[d]);
            dot = warp_sum(dot);
            if (lane == 0) scores[p] = dot * scale;
        }
        __syncthreads();
        float local = -INFINITY;
        for (int p = threadIdx.x; p < n; p += blockDim.x) local = fmaxf(local, scores[p]);
        const float new_m = fmaxf(m, block_max(local, scratch));
        const float corr = m == -INFINITY ? 0.0f : expf(m - new_m);
        float part = 0.0f;
        for (int p = threadIdx.x; p < n; p += blockDim.x) {
            scores[p] = expf(scores[p] - new_m);
            part += scores[p];
        }
        l = l * corr + block_sum(part, scratch);
        for (int k = 0; k < FW_ATTN_MAX_D / 128; ++k) {
            const int d = k * (int)blockDim.x + (int)threadIdx.x;
            if (d >= head_dim) break;
            float a = acc[k] * corr;
            for (int p = 0; p < n; ++p) {
                const int pos = start + p;
                const int blk = block_table[(size_t)s * max_blocks + pos / block_size];
                a += scores[p] * to_f32(v_cache[(((size_t)blk * block_size + pos % block_size) *
                                                     kv_heads + g) * head_dim + d]);
            }
            acc[k] = a;
        }
        m = new_m;
        __syncthreads();
    }
    for (int k = 0; k < FW_ATTN_MAX_D / 128; ++k) {
        const int d = k * (int)blockDim.x + (int)threadIdx.x;
        if (d >= head_dim) break;
        out[((size_t)s * heads + h) * head_dim + d] = from_f32<T>(l > 0.0f ? acc[k] / l : 0.0f);
    }
}

}  // namespace fw

#define FW_PAGED_ATTN(SUFFIX, T)                                                                \
    extern "C" __global__ void __launch_bounds__(128) paged_decode_attention_##SUFFIX(          \
        const T* q, const T* k_cache, const T* v_cache, const int* block_table,                 \
        const int* seq_lens, T* out, int seqs, int heads, int kv_heads, int head_dim,           \
        int block_size, int max_blocks, float scale) {                                           \
        fw::paged_decode_attention_impl<T>(q, k_cache, v_cache, block_table, seq_lens, out,     \
                                           seqs, heads, kv_heads, head_dim, block_size,         \
                                           max_blocks, scale);                                   \
    }

FW_PAGED_ATTN(f16, __half)
FW_PAGED_ATTN(bf16, __nv_bfloat16)
