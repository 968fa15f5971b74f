// The kernels of kernels/*.cu built for the CPU through cuda_emu.h, with one C entry point per
// kernel, `emu_<kernel>(grid_x, grid_y, block_x, <kernel arguments>)`, for the Rust tests.
#include "cuda_emu.h"

#include "../act.cu"
#include "../attention.cu"
#include "../lora.cu"
#include "../norm.cu"
#include "../qmatvec.cu"
#include "../rope.cu"

#define EMU_UNPACK(...) __VA_ARGS__
#define EMU_ENTRY(NAME, PARAMS, ARGS)                                                           \
    extern "C" void emu_##NAME(unsigned gx, unsigned gy, unsigned bx, EMU_UNPACK PARAMS) {      \
        emu::launch(&NAME, dim3(gx, gy), dim3(bx), EMU_UNPACK ARGS);                            \
    }

#define EMU_TYPED(SUFFIX, T)                                                                    \
    EMU_ENTRY(lora_shrink_bgmv_##SUFFIX,                                                        \
              (const T* x, const T* A, const int* slot, float* v, int rows, int in, int r,      \
               int slots),                                                                      \
              (x, A, slot, v, rows, in, r, slots))                                              \
    EMU_ENTRY(lora_shrink_sgmv_##SUFFIX,                                                        \
              (const T* x, const T* A, const int* seg_start, const int* seg_slot, float* v,     \
               int segments, int in, int r, int slots),                                         \
              (x, A, seg_start, seg_slot, v, segments, in, r, slots))                           \
    EMU_ENTRY(lora_expand_add_##SUFFIX,                                                         \
              (const float* v, const T* B, const int* slot, const float* scale, T* y, int rows, \
               int r, int n, int y_stride, int y_offset, int slots),                            \
              (v, B, slot, scale, y, rows, r, n, y_stride, y_offset, slots))                    \
    EMU_ENTRY(rms_norm_##SUFFIX,                                                                \
              (const T* x, const T* residual, const T* w, T* out, T* residual_out, int rows,    \
               int dim, float eps),                                                             \
              (x, residual, w, out, residual_out, rows, dim, eps))                              \
    EMU_ENTRY(rope_##SUFFIX,                                                                    \
              (T * x, const int* pos, int n, int heads, int head_dim, float theta, int neox),   \
              (x, pos, n, heads, head_dim, theta, neox))                                        \
    EMU_ENTRY(silu_mul_##SUFFIX, (const T* gu, T* out, int rows, int ffn), (gu, out, rows, ffn)) \
    EMU_ENTRY(paged_decode_attention_##SUFFIX,                                                  \
              (const T* q, const T* k_cache, const T* v_cache, const int* block_table,          \
               const int* seq_lens, T* out, int seqs, int heads, int kv_heads, int head_dim,    \
               int block_size, int max_blocks, float scale),                                    \
              (q, k_cache, v_cache, block_table, seq_lens, out, seqs, heads, kv_heads,          \
               head_dim, block_size, max_blocks, scale))                                        \
    EMU_ENTRY(q8_0_matvec_##SUFFIX, (const void* w, const T* x, T* y, int rows, int cols),      \
              (w, x, y, rows, cols))                                                            \
    EMU_ENTRY(q4_1_matvec_##SUFFIX, (const void* w, const T* x, T* y, int rows, int cols),      \
              (w, x, y, rows, cols))

EMU_TYPED(f16, __half)
EMU_TYPED(bf16, __nv_bfloat16)
