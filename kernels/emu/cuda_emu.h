// A small CUDA emulation for the CPU, so the kernels in kernels/*.cu run unchanged under g++
// (C++20) in the tests: one OS thread per CUDA thread (from a pool kept across blocks and launches),
// blocks one after another, thread-local
// threadIdx/blockIdx/blockDim/gridDim, __syncthreads as a block barrier, warp shuffles through a
// per-warp exchange, atomics, and f16/bf16 storage types with round-to-nearest-even conversion.
//
// Static `__shared__` arrays become function statics: shared by the threads of the running block,
// and, as blocks run in sequence, never by two blocks at once. It is for correctness only: no
// timing, no tensor-core instructions (kernels keep a portable path for those).
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct __half {
    uint16_t bits;
};
struct __nv_bfloat16 {
    uint16_t bits;
};

namespace emu {

inline float bits_to_f32(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline uint32_t f32_to_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

inline float half_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    const uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0) {
        // Zero or subnormal: man * 2^-24.
        float v = std::ldexp((float)man, -24);
        return sign ? -v : v;
    }
    if (exp == 31) return bits_to_f32(sign | 0x7f800000u | (man << 13));
    return bits_to_f32(sign | ((exp + 112) << 23) | (man << 13));
}

inline uint16_t f32_to_half(float f) {
    const uint32_t u = f32_to_bits(f);
    const uint16_t sign = (u >> 16) & 0x8000;
    const uint32_t abs = u & 0x7fffffffu;
    if (abs >= 0x7f800000u) return sign | (abs > 0x7f800000u ? 0x7e00 : 0x7c00);
    if (abs >= 0x477ff000u) return sign | 0x7c00;  // rounds past the largest half: infinity
    if (abs < 0x38800000u) {
        // Subnormal half (or zero): round abs * 2^24 to an integer, ties to even.
        const float v = bits_to_f32(abs) * 16777216.0f;
        return sign | (uint16_t)std::nearbyint(v);
    }
    const uint32_t exp = (abs >> 23) - 112, man = abs & 0x7fffff;
    uint32_t h = (exp << 10) | (man >> 13);
    const uint32_t rest = man & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) ++h;
    return sign | (uint16_t)h;
}

inline float bf16_to_f32(uint16_t b) { return bits_to_f32((uint32_t)b << 16); }

inline uint16_t f32_to_bf16(float f) {
    const uint32_t u = f32_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

// The running block: its barrier, and one exchange (slots and barrier) per warp.
struct Warp {
    std::unique_ptr<std::barrier<>> sync;
    uint64_t slots[32];
};
struct Block {
    std::unique_ptr<std::barrier<>> sync;
    std::vector<Warp> warps;
};

inline thread_local dim3 thread_idx, block_idx, block_dim, grid_dim;
inline thread_local Block* block = nullptr;

inline unsigned linear_thread() {
    return thread_idx.x + block_dim.x * (thread_idx.y + block_dim.y * thread_idx.z);
}

template <typename V>
V exchange(V v, int src_lane, bool valid) {
    static_assert(sizeof(V) <= 8, "shuffles move at most 8 bytes");
    const unsigned t = linear_thread();
    Warp& w = block->warps[t / 32];
    const unsigned lane = t % 32;
    std::memcpy(&w.slots[lane], &v, sizeof(V));
    w.sync->arrive_and_wait();
    V out = v;
    if (valid) std::memcpy(&out, &w.slots[src_lane], sizeof(V));
    w.sync->arrive_and_wait();
    return out;
}

inline unsigned warp_size_of(unsigned t) {
    const unsigned n = block_dim.x * block_dim.y * block_dim.z;
    const unsigned first = t / 32 * 32;
    return n - first < 32 ? n - first : 32;
}

// The OS threads that play a block's CUDA threads: thread i runs CUDA thread i of every block,
// so threads are started once per process instead of once per block. `run` hands one block to
// the first n threads and returns when all of them have finished it.
class Pool {
  public:
    static Pool& get() {
        static Pool* pool = new Pool();  // never destroyed: workers outlive static teardown
        return *pool;
    }

    // Callers take turns (see launch_lock).
    void run(unsigned n, const std::function<void(unsigned)>& job) {
        const uint64_t before = state_.load(std::memory_order_acquire);
        while (workers_ < n) {
            const unsigned i = workers_++;
            std::thread([this, i, before] { work(i, before); }).detach();
        }
        job_.store(&job, std::memory_order_relaxed);
        remaining_.store(n, std::memory_order_relaxed);
        // One word holds the generation and the block size, so a worker never pairs one block's
        // size with another's generation.
        state_.store(((before >> 32) + 1) << 32 | n, std::memory_order_release);
        state_.notify_all();
        for (unsigned r; (r = remaining_.load(std::memory_order_acquire)) != 0;)
            remaining_.wait(r, std::memory_order_acquire);
    }

  private:
    void work(unsigned i, uint64_t seen) {
        for (;;) {
            state_.wait(seen, std::memory_order_acquire);
            seen = state_.load(std::memory_order_acquire);
            // A worker the block needs holds its generation open until it finishes, so the job
            // it reads is that block's.
            if (i >= (unsigned)(seen & 0xffffffffu)) continue;
            (*job_.load(std::memory_order_relaxed))(i);
            if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) remaining_.notify_one();
        }
    }

    std::atomic<uint64_t> state_{0};
    std::atomic<unsigned> remaining_{0};
    std::atomic<const std::function<void(unsigned)>*> job_{nullptr};
    unsigned workers_ = 0;
};

// Held for a whole launch: launches from different host threads take turns, as the pool runs one
// block at a time and a kernel's `__shared__` statics belong to its running block.
inline std::mutex& launch_lock() {
    static std::mutex* m = new std::mutex();
    return *m;
}

// Runs `kernel(args...)` over the grid: blocks in sequence, each block's threads at once.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block_size, A... args) {
    std::lock_guard<std::mutex> guard(launch_lock());
    const unsigned n = block_size.x * block_size.y * block_size.z;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                Block b;
                b.sync = std::make_unique<std::barrier<>>((std::ptrdiff_t)n);
                b.warps.resize((n + 31) / 32);
                for (unsigned w = 0; w < b.warps.size(); ++w) {
                    const unsigned size = n - w * 32 < 32 ? n - w * 32 : 32;
                    b.warps[w].sync = std::make_unique<std::barrier<>>((std::ptrdiff_t)size);
                }
                const std::function<void(unsigned)> job = [&](unsigned t) {
                    block = &b;
                    block_dim = block_size;
                    grid_dim = grid;
                    block_idx = dim3(bx, by, bz);
                    thread_idx = dim3(t % block_size.x, t / block_size.x % block_size.y,
                                      t / (block_size.x * block_size.y));
                    kernel(args...);
                    // A thread that returns early leaves the block's and its warp's barriers,
                    // so the others do not wait for it.
                    b.warps[t / 32].sync->arrive_and_drop();
                    b.sync->arrive_and_drop();
                };
                Pool::get().run(n, job);
            }
}

}  // namespace emu

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

inline void __syncthreads() { emu::block->sync->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) {
    emu::block->warps[emu::linear_thread() / 32].sync->arrive_and_wait();
}

template <typename V>
V __shfl_xor_sync(unsigned, V v, int lane_mask, int width = 32) {
    const unsigned lane = emu::linear_thread() % 32;
    const unsigned src = lane ^ (unsigned)lane_mask;
    return emu::exchange(v, (int)src,
                         src / width == lane / width && src < emu::warp_size_of(emu::linear_thread()));
}
template <typename V>
V __shfl_down_sync(unsigned, V v, unsigned delta, int width = 32) {
    const unsigned lane = emu::linear_thread() % 32;
    const unsigned src = lane + delta;
    return emu::exchange(v, (int)src,
                         src / width == lane / width && src < emu::warp_size_of(emu::linear_thread()));
}
template <typename V>
V __shfl_sync(unsigned, V v, int src_lane, int width = 32) {
    const unsigned lane = emu::linear_thread() % 32;
    const unsigned src = lane / width * width + (unsigned)src_lane % width;
    return emu::exchange(v, (int)src, src < emu::warp_size_of(emu::linear_thread()));
}

inline float atomicAdd(float* addr, float v) { return std::atomic_ref<float>(*addr).fetch_add(v); }
inline int atomicAdd(int* addr, int v) { return std::atomic_ref<int>(*addr).fetch_add(v); }
inline float atomicMax(float* addr, float v) {
    std::atomic_ref<float> a(*addr);
    float old = a.load();
    while (old < v && !a.compare_exchange_weak(old, v)) {
    }
    return old;
}

inline float __half2float(__half h) { return emu::half_to_f32(h.bits); }
inline __half __float2half(float f) { return __half{emu::f32_to_half(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return emu::bf16_to_f32(b.bits); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16{emu::f32_to_bf16(f)}; }

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline void sincosf(float x, float* s, float* c) {
    *s = std::sin(x);
    *c = std::cos(x);
}
using std::min;
