/* moek_cuda.c - a libmoek_cuda.so stand-in for tests/cli/test_nccl_standin.sh:
 * every kernel is libmoek_cpu.so's (found through DT_NEEDED); the device
 * services allocate through the stand-in CUDA runtime (so the NCCL backend
 * sees "device" pointers) and hand out cudaStreamPerThread as the compute
 * stream, which the stand-in runtime treats as the host: the CPU kernels
 * have run when they return.  Graphs: libmoek_cpu.so's "not supported"
 * (run it with --no-graph). */
#include <cuda_runtime.h>

#include <dlfcn.h>
#include <stdio.h>

#include "../../kernels/moek.h"

int moek_device_count(void)
{
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

int moek_device_init(moek_ctx *ctx, int64_t device_index, int64_t workspace_bytes, char *err,
                     int64_t errlen)
{
    int (*cpu)(moek_ctx *, int64_t, int64_t, char *, int64_t);
    void *sym = dlsym(RTLD_NEXT, "moek_device_init");
    *(void **)&cpu = sym;
    if (!cpu) {
        snprintf(err, (size_t)errlen, "stand-in: libmoek_cpu.so's moek_device_init not found");
        return -1;
    }
    if (cpu(ctx, device_index, workspace_bytes, err, errlen))
        return -1;
    ctx->stream = cudaStreamPerThread;
    return 0;
}

void *moek_device_alloc(const moek_ctx *ctx, int64_t bytes, char *err, int64_t errlen)
{
    (void)ctx;
    void *p = NULL;
    if (bytes < 0 || cudaMalloc(&p, (size_t)bytes) != cudaSuccess) {
        snprintf(err, (size_t)errlen, "stand-in: cudaMalloc of %lld bytes failed", (long long)bytes);
        return NULL;
    }
    return p;
}

void moek_device_free(const moek_ctx *ctx, void *p)
{
    (void)ctx;
    cudaFree(p);
}
