/* cuemu_rt.h - the C side of the CUDA-language emulator (cuemu.c): what the
 * C++ shim (cuemu.h) calls to launch a grid and to meet the other threads
 * of a block or warp.  Test code only; see cuemu.h for the whole picture. */
#ifndef CUEMU_RT_H
#define CUEMU_RT_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cuemu_dim3 {
    unsigned x, y, z;
} cuemu_dim3;

/* The built-in variables of the thread that is running now. */
typedef struct cuemu_view {
    cuemu_dim3 thread_idx, block_idx, block_dim, grid_dim;
    unsigned char *dynamic_shared;
} cuemu_view;

/* One launch: `body(args)` runs the kernel as the current thread. */
typedef struct cuemu_grid {
    const char *name;          /* the kernel as written at the launch */
    const void *fn;            /* its address (cudaFuncSetAttribute's key) */
    cuemu_dim3 grid, block;
    size_t shared_bytes;       /* dynamic shared memory per block */
    void (*body)(void *args);
    void *args;
    void (*drop)(void *args);  /* frees args once the grid (or its graph) is done */
} cuemu_grid;

/* Checks the configuration as cudaLaunchKernel does (an error is returned
 * and left for cudaGetLastError) and queues the grid on stream s. */
cudaError_t cuemu_launch(const cuemu_grid *g, cudaStream_t s);

/* The running thread's view, NULL outside a kernel. */
extern cuemu_view *cuemu_current __attribute__((visibility("hidden")));
void cuemu_outside_kernel(void) __attribute__((noreturn));

static inline const cuemu_view *cuemu_here(void)
{
    if (__builtin_expect(!cuemu_current, 0))
        cuemu_outside_kernel();
    return cuemu_current;
}

static inline int cuemu_lane(void)
{
    const cuemu_view *v = cuemu_here();
    unsigned i = v->thread_idx.x + v->block_dim.x * (v->thread_idx.y + v->block_dim.y * v->thread_idx.z);
    return (int)(i % 32);
}
void cuemu_syncthreads(void);
/* A warp collective: waits for the live lanes of mask; each lane gives
 * `bits` and gets those of lane src (its own if src is out of range). */
uint64_t cuemu_warp_exchange(unsigned mask, uint64_t bits, int src);
/* true for the lowest live lane of the warp */
int cuemu_warp_leader(void);
/* cp.async: queued per thread, performed at the wait that covers them */
void cuemu_cp_async(void *dst, const void *src, int n);
void cuemu_cp_commit(void);
void cuemu_cp_wait(int pending);

#ifdef __cplusplus
}
#endif

#endif
