/* moek_cuda.c - a libmoek_cuda.so stand-in, so the runtime's device path
 * runs without a GPU: every kernel is libmoek_cpu.so's (found through
 * DT_NEEDED); the device services and graphs are these.
 *
 * Built two ways (tests/cli/test_gpu_train.sh, test_nccl_standin.sh):
 * - plain: device memory is libmoek_cpu.so's host memory, no stream;
 * - with -DSTANDIN_CUDART, against the stand-in CUDA runtime (cudart.c):
 *   memory comes from its cudaMalloc (so the NCCL backend sees "device"
 *   pointers) and the compute stream is cudaStreamPerThread, which that
 *   runtime treats as the host: the CPU kernels have run when they return.
 * Graph capture is refused ("stand-in: capture refused"), and
 * STANDIN_SYNC_FAIL_AT=n makes moek_device_sync fail from its n-th call on
 * as a kernel that found bad data would.  Test code: a call counter. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

#include "../../kernels/moek.h"

#ifdef STANDIN_CUDART
#include <cuda_runtime.h>
#endif

int moek_device_count(void)
{
    const char *v = getenv("STANDIN_GPUS");
    return v ? atoi(v) : 1;
}

#ifdef STANDIN_CUDART
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
#endif

int moek_graph_begin(const moek_ctx *ctx, char *err, int64_t errlen)
{
    (void)ctx;
    snprintf(err, (size_t)errlen, "stand-in: capture refused");
    return -1;
}

int moek_graph_end(const moek_ctx *ctx, void **graph, char *err, int64_t errlen)
{
    (void)ctx;
    *graph = NULL;
    snprintf(err, (size_t)errlen, "stand-in: no capture");
    return -1;
}

int moek_graph_launch(const moek_ctx *ctx, void *graph, char *err, int64_t errlen)
{
    (void)ctx;
    (void)graph;
    snprintf(err, (size_t)errlen, "stand-in: no graph");
    return -1;
}

void moek_graph_free(void *graph)
{
    (void)graph;
}

int moek_device_sync(const moek_ctx *ctx, char *err, int64_t errlen)
{
    static int calls;
    const char *at = getenv("STANDIN_SYNC_FAIL_AT");
    if (!at || ++calls < atoi(at))
        return 0;
    if (*ctx->status == 0)
        *ctx->status = MOEK_E_INDEX;
    snprintf(err, (size_t)errlen, "stand-in: a kernel found bad data");
    return -1;
}
