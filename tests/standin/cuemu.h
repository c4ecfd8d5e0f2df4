/* cuemu.h - the CUDA language on the CPU, so that the kernel library's own
 * sources (kernels/cuda/, every .cu file) run and are tested on a machine without a
 * GPU.  Test code only: nothing here is shipped or used by ./run on a GPU.
 *
 * How a .cu file becomes host C++ (the Makefile's cuemu rules):
 *  - tests/standin/cuemu.sed rewrites the two things C++ cannot parse:
 *    `k<<<grid, block, shm, stream>>>(args)` becomes
 *    `cuemu::launch("k", k, grid, block, shm, stream)(args)`, and
 *    `extern __shared__ T name[];` becomes a pointer to the block's
 *    dynamic shared memory;
 *  - g++ compiles the result with this header forced in (-include) and
 *    tests/standin/include first on the include path (mma.h: WMMA);
 *  - it links against the stand-in CUDA runtime (cudart.c) and cuBLAS
 *    (cublas.c), which run each stream's work on a thread of its own,
 *    and the emulator (cuemu.c), which runs a block's threads as fibers.
 *
 * What a kernel sees: threadIdx and friends; __syncthreads, __syncwarp and
 * the shuffles as real barriers among the block's or warp's live threads;
 * __shared__ variables (statics: the emulated device runs one block at a
 * time; dynamic shared memory is filled with 0xff bytes at each block's
 * start, so reading what no thread wrote gives NaN); the integer atomics;
 * cp.async queued until its wait; WMMA with a layout of our own.
 * What it does not see: concurrency between blocks (they run one after
 * another), memory spaces (every pointer is host memory), fused
 * multiply-adds (nvcc contracts a*b+c; g++ here does not), and warps
 * running in lock-step (never promised since Volta, and a kernel that
 * relies on it fails here). */
#ifndef CUEMU_H
#define CUEMU_H

#define MOEK_CUDA_EMULATED 1

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <tuple>
#include <type_traits>
#include <utility>

#include "cuemu_rt.h"

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

#define threadIdx (cuemu_here()->thread_idx)
#define blockIdx (cuemu_here()->block_idx)
#define blockDim (cuemu_here()->block_dim)
#define gridDim (cuemu_here()->grid_dim)
#define warpSize 32

static inline void __syncthreads() { cuemu_syncthreads(); }
static inline void __syncwarp(unsigned mask = 0xffffffffu) { cuemu_warp_exchange(mask, 0, -1); }

template <typename T> static inline T cuemu_shfl(unsigned mask, T v, int src)
{
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a word");
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof v);
    bits = cuemu_warp_exchange(mask, bits, src);
    T r;
    memcpy(&r, &bits, sizeof r);
    return r;
}

/* width: lanes are taken in segments of `width`, as on the hardware */
template <typename T> static inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32)
{
    int lane = cuemu_lane(), base = lane & ~(width - 1), src = lane ^ lane_mask;
    return cuemu_shfl(mask, v, src >= base + width ? lane : src);
}

/* ---- atomics: one grid runs at a time, on one OS thread, so plain
 * read-modify-writes would do; real atomics cost nothing here.  Only what
 * the kernels use: another intrinsic is a compile error here, to be added
 * with a kernel that needs it. */
static inline int atomicCAS(int *p, int cmp, int val)
{
    __atomic_compare_exchange_n(p, &cmp, val, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return cmp;
}
static inline int atomicAdd(int *p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }

/* ---- arithmetic intrinsics (round-to-nearest, as the default) ---------- */
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fmul_rn(float a, float b) { return a * b; }

/* ---- launches ------------------------------------------------------------- */
namespace cuemu {

template <typename... P> struct kernel_call {
    void (*fn)(P...);
    std::tuple<typename std::decay<P>::type...> args;
    static void run(void *self)
    {
        kernel_call *k = static_cast<kernel_call *>(self);
        std::apply(k->fn, k->args);   /* each thread gets its own copy of the arguments */
    }
    static void drop(void *self) { delete static_cast<kernel_call *>(self); }
};

template <typename... P> struct launcher {
    const char *name;
    void (*fn)(P...);
    cuemu_dim3 grid, block;
    size_t shared;
    cudaStream_t stream;
    template <typename... A> void operator()(A &&...a) const
    {
        static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong argument count");
        auto *k = new kernel_call<P...>{fn, {std::forward<A>(a)...}};
        cuemu_grid g = {name,  reinterpret_cast<const void *>(fn), grid, block, shared,
                        &kernel_call<P...>::run, k, &kernel_call<P...>::drop};
        cuemu_launch(&g, stream);
    }
};

template <typename... P>
launcher<P...> launch(const char *name, void (*fn)(P...), dim3 grid, dim3 block, size_t shared = 0,
                      cudaStream_t stream = 0)
{
    return {name, fn, {grid.x, grid.y, grid.z}, {block.x, block.y, block.z}, shared, stream};
}

} // namespace cuemu

#endif
