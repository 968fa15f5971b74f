// The kernels of kernels/*.cu built for the CPU through cuda_emu.h, for the Rust tests, with two
// C entry points per kernel:
//   `emu_<kernel>(grid_x, grid_y, block_x, <kernel arguments>)`, typed;
//   `emu_call_<kernel>(grid_x, grid_y, block_x, void** params)`, where params[i] points at the
//   i-th argument, as cuLaunchKernel takes them (what the emulated device of the GPU forward
//   pass launches through).
#include <cstddef>
#include <type_traits>
#include <utility>

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
    EMU_ENTRY(q8_0_matvec_##SUFFIX,                                                             \
              (const void* w, const T* x, T* y, int rows, int cols, int n),                     \
              (w, x, y, rows, cols, n))                                                         \
    EMU_ENTRY(q4_1_matvec_##SUFFIX,                                                             \
              (const void* w, const T* x, T* y, int rows, int cols, int n),                     \
              (w, x, y, rows, cols, n))                                                         \
    EMU_ENTRY(q8_0_logits_##SUFFIX,                                                             \
              (const void* w, const T* x, float* y, int rows, int cols, int n),                 \
              (w, x, y, rows, cols, n))                                                         \
    EMU_ENTRY(q4_1_logits_##SUFFIX,                                                             \
              (const void* w, const T* x, float* y, int rows, int cols, int n),                 \
              (w, x, y, rows, cols, n))                                                         \
    EMU_ENTRY(q8_0_get_rows_##SUFFIX,                                                           \
              (const void* w, const int* ids, T* out, int n, int cols), (w, ids, out, n, cols)) \
    EMU_ENTRY(q4_1_get_rows_##SUFFIX,                                                           \
              (const void* w, const int* ids, T* out, int n, int cols), (w, ids, out, n, cols))

EMU_TYPED(f16, __half)
EMU_TYPED(bf16, __nv_bfloat16)

namespace {

// Unpacks cuLaunchKernel-style parameters into a typed launch of `kernel`.
template <typename... P, std::size_t... I>
void launch_params(void (*kernel)(P...), dim3 grid, dim3 block, void** params,
                   std::index_sequence<I...>) {
    emu::launch(kernel, grid, block, *static_cast<std::remove_reference_t<P>*>(params[I])...);
}

template <typename... P>
void launch_params(void (*kernel)(P...), dim3 grid, dim3 block, void** params) {
    launch_params(kernel, grid, block, params, std::index_sequence_for<P...>{});
}

}  // namespace

#define EMU_CALL(NAME)                                                                          \
    extern "C" void emu_call_##NAME(unsigned gx, unsigned gy, unsigned bx, void** params) {     \
        launch_params(&NAME, dim3(gx, gy), dim3(bx), params);                                   \
    }

#define EMU_CALLS(SUFFIX)                                                                       \
    EMU_CALL(lora_shrink_bgmv_##SUFFIX)                                                         \
    EMU_CALL(lora_shrink_sgmv_##SUFFIX)                                                         \
    EMU_CALL(lora_expand_add_##SUFFIX)                                                          \
    EMU_CALL(rms_norm_##SUFFIX)                                                                 \
    EMU_CALL(rope_##SUFFIX)                                                                     \
    EMU_CALL(qkv_rope_cache_##SUFFIX)                                                           \
    EMU_CALL(silu_mul_##SUFFIX)                                                                 \
    EMU_CALL(gather_rows_##SUFFIX)                                                              \
    EMU_CALL(paged_decode_attention_##SUFFIX)                                                   \
    EMU_CALL(q8_0_matvec_##SUFFIX)                                                              \
    EMU_CALL(q4_1_matvec_##SUFFIX)                                                              \
    EMU_CALL(q8_0_logits_##SUFFIX)                                                              \
    EMU_CALL(q4_1_logits_##SUFFIX)                                                              \
    EMU_CALL(q8_0_get_rows_##SUFFIX)                                                            \
    EMU_CALL(q4_1_get_rows_##SUFFIX)

EMU_CALLS(f16)
EMU_CALLS(bf16)
