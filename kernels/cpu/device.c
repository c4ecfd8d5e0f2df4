/* device.c - device services of the CPU library: host memory, memcpy, and
 * no CUDA graphs.  These are the only functions here that allocate. */
#include <stdio.h>
#include <stdlib.h>

#include "kcpu.h"

/* 64 bytes: one cache line, and enough for any SIMD load the compiler emits. */
#define KCPU_ALIGN 64

static void *kcpu_zalloc(int64_t bytes)
{
    size_t n = bytes > 0 ? (size_t)bytes : 1;
    n = (n + KCPU_ALIGN - 1) / KCPU_ALIGN * KCPU_ALIGN;
    void *p = aligned_alloc(KCPU_ALIGN, n);
    if (p)
        memset(p, 0, n);
    return p;
}

int moek_device_count(void) { return 1; }

int moek_device_half_native(void) { return 0; }   /* the _bf16/_f16 kernels widen into the workspace */

int moek_device_init(moek_ctx *ctx, int64_t device_index, int64_t workspace_bytes, char *err,
                     int64_t errlen)
{
    if (!ctx) {
        snprintf(err, (size_t)errlen, "cpu device: no context to initialise");
        return -1;
    }
    if (device_index != 0) {
        snprintf(err, (size_t)errlen, "cpu device: index %lld out of range (the CPU library has 1 device)",
                 (long long)device_index);
        return -1;
    }
    if (workspace_bytes < 0) {
        snprintf(err, (size_t)errlen, "cpu device: negative workspace size %lld",
                 (long long)workspace_bytes);
        return -1;
    }
    ctx->stream = NULL;
    ctx->blas = NULL;
    ctx->workspace = NULL;
    ctx->workspace_bytes = 0;
    if (workspace_bytes > 0) {
        ctx->workspace = kcpu_zalloc(workspace_bytes);
        if (!ctx->workspace) {
            snprintf(err, (size_t)errlen, "cpu device: cannot allocate %lld bytes of workspace",
                     (long long)workspace_bytes);
            return -1;
        }
        ctx->workspace_bytes = workspace_bytes;
    }
    return 0;
}

void moek_device_fini(moek_ctx *ctx)
{
    if (!ctx)
        return;
    free(ctx->workspace);
    ctx->workspace = NULL;
    ctx->workspace_bytes = 0;
}

void *moek_device_alloc(const moek_ctx *ctx, int64_t bytes, char *err, int64_t errlen)
{
    (void)ctx;
    if (bytes < 0) {
        snprintf(err, (size_t)errlen, "cpu device: negative allocation size %lld", (long long)bytes);
        return NULL;
    }
    void *p = kcpu_zalloc(bytes);
    if (!p)
        snprintf(err, (size_t)errlen, "cpu device: out of memory allocating %lld bytes",
                 (long long)bytes);
    return p;
}

void moek_device_free(const moek_ctx *ctx, void *p)
{
    (void)ctx;
    free(p);
}

int moek_device_copy(const moek_ctx *ctx, void *dst, const void *src, int64_t bytes, int64_t kind,
                     char *err, int64_t errlen)
{
    (void)ctx;
    if (kind < MOEK_COPY_H2D || kind > MOEK_COPY_D2D) {
        snprintf(err, (size_t)errlen, "cpu device: unknown copy kind %lld", (long long)kind);
        return -1;
    }
    if (bytes < 0) {
        snprintf(err, (size_t)errlen, "cpu device: negative copy size %lld", (long long)bytes);
        return -1;
    }
    if (bytes > 0)
        memmove(dst, src, (size_t)bytes);
    return 0;
}

int moek_device_sync(const moek_ctx *ctx, char *err, int64_t errlen)
{
    (void)ctx;
    (void)err;
    (void)errlen;
    return 0;
}

#define KCPU_NO_GRAPHS "CUDA graphs need the CUDA kernel library (libmoek_cuda.so); the CPU library runs ops one by one"

int moek_graph_begin(const moek_ctx *ctx, char *err, int64_t errlen)
{
    (void)ctx;
    snprintf(err, (size_t)errlen, "%s", KCPU_NO_GRAPHS);
    return -1;
}

int moek_graph_end(const moek_ctx *ctx, void **graph, char *err, int64_t errlen)
{
    (void)ctx;
    if (graph)
        *graph = NULL;
    snprintf(err, (size_t)errlen, "%s", KCPU_NO_GRAPHS);
    return -1;
}

int moek_graph_launch(const moek_ctx *ctx, void *graph, char *err, int64_t errlen)
{
    (void)ctx;
    (void)graph;
    snprintf(err, (size_t)errlen, "%s", KCPU_NO_GRAPHS);
    return -1;
}

void moek_graph_free(void *graph) { (void)graph; }
