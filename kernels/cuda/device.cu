/* device.cu - device services of the CUDA library: device selection, the
 * stream and cuBLAS handle, allocation, copies, synchronisation and CUDA
 * graphs.  These are the only functions here that allocate. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kcuda.cuh"

/* cuBLAS's own workspace; NVIDIA recommends 32 MiB on Hopper.  Given to
 * cuBLAS once so that graph capture never sees it allocate. */
#define KCUDA_BLAS_WS (32u << 20)

static void kc_msg(char *err, int64_t errlen, const char *what, cudaError_t e)
{
    if (err && errlen > 0)
        snprintf(err, (size_t)errlen, "cuda: %s: %s", what, cudaGetErrorString(e));
}

static void kc_blas_msg(char *err, int64_t errlen, const char *what, cublasStatus_t s)
{
    if (err && errlen > 0)
        snprintf(err, (size_t)errlen, "cublas: %s: %s", what, cublasGetStatusString(s));
}

static int kc_count(void)
{
    int n = 0;
    /* no driver, no device: an error code, never a crash or a print */
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();   /* clear the sticky-free error so later calls start clean */
        return 0;
    }
    return n;
}

extern "C" int moek_device_count(void) { return kc_count(); }

extern "C" int moek_device_half_native(void) { return 1; }

static void kc_release(moek_ctx *ctx)
{
    kcuda_handles *h = kc_handles(ctx);
    if (h) {
        if (h->blas)
            cublasDestroy(h->blas);
        if (h->lt)
            cublasLtDestroy(h->lt);
        cudaFree(h->blas_ws);
        cudaFree(h->dev_status);
        cudaFree(h->scratch);
        free(h);
    }
    if (ctx->workspace)
        cudaFree(ctx->workspace);
    if (ctx->stream)
        cudaStreamDestroy((cudaStream_t)ctx->stream);
    ctx->blas = nullptr;
    ctx->workspace = nullptr;
    ctx->workspace_bytes = 0;
    ctx->stream = nullptr;
}

extern "C" int moek_device_init(moek_ctx *ctx, int64_t device_index, int64_t workspace_bytes,
                                char *err, int64_t errlen)
{
    if (!ctx) {
        snprintf(err, (size_t)errlen, "cuda device: no context to initialise");
        return -1;
    }
    ctx->stream = nullptr;
    ctx->blas = nullptr;
    ctx->workspace = nullptr;
    ctx->workspace_bytes = 0;
    int n = kc_count();
    if (device_index < 0 || device_index >= n) {
        snprintf(err, (size_t)errlen, "cuda device: index %lld out of range (%d device%s found)",
                 (long long)device_index, n, n == 1 ? "" : "s");
        return -1;
    }
    if (workspace_bytes < 0) {
        snprintf(err, (size_t)errlen, "cuda device: negative workspace size %lld",
                 (long long)workspace_bytes);
        return -1;
    }
    cudaError_t e = cudaSetDevice((int)device_index);
    if (e != cudaSuccess) {
        kc_msg(err, errlen, "cudaSetDevice", e);
        return -1;
    }
    cudaStream_t s;
    e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
    if (e != cudaSuccess) {
        kc_msg(err, errlen, "cudaStreamCreate", e);
        return -1;
    }
    ctx->stream = s;
    kcuda_handles *h = (kcuda_handles *)calloc(1, sizeof *h);
    if (!h) {
        snprintf(err, (size_t)errlen, "cuda device: out of host memory");
        kc_release(ctx);
        return -1;
    }
    ctx->blas = h;
    cublasStatus_t bs = cublasCreate(&h->blas);
    if (bs != CUBLAS_STATUS_SUCCESS) {
        h->blas = nullptr;
        kc_blas_msg(err, errlen, "cublasCreate", bs);
        kc_release(ctx);
        return -1;
    }
    h->blas_ws_bytes = KCUDA_BLAS_WS;
    const char *what = "cudaMalloc (cuBLAS workspace)";
    e = cudaMalloc(&h->blas_ws, h->blas_ws_bytes);
    if (e == cudaSuccess) {
        what = "cudaMalloc (status flag)";
        e = cudaMalloc((void **)&h->dev_status, sizeof(int));
    }
    if (e == cudaSuccess)
        e = cudaMemset(h->dev_status, 0, sizeof(int));
    if (e == cudaSuccess) {
        what = "cudaMalloc (reduction scratch)";
        e = cudaMalloc((void **)&h->scratch, KCUDA_SCRATCH * sizeof(double));
    }
    if (e == cudaSuccess && workspace_bytes > 0) {
        what = "cudaMalloc (workspace)";
        e = cudaMalloc(&ctx->workspace, (size_t)workspace_bytes);
        if (e == cudaSuccess)
            e = cudaMemset(ctx->workspace, 0, (size_t)workspace_bytes);
        if (e == cudaSuccess)
            ctx->workspace_bytes = workspace_bytes;
    }
    if (e != cudaSuccess) {
        kc_msg(err, errlen, what, e);
        kc_release(ctx);
        return -1;
    }
    /* fp32 means fp32: default math mode, no TF32 tensor-op shortcut */
    const char *bwhat = "cublasSetStream";
    bs = cublasSetStream(h->blas, s);
    if (bs == CUBLAS_STATUS_SUCCESS) {
        bwhat = "cublasSetWorkspace";
        bs = cublasSetWorkspace(h->blas, h->blas_ws, h->blas_ws_bytes);
    }
    if (bs == CUBLAS_STATUS_SUCCESS) {
        bwhat = "cublasSetMathMode";
        bs = cublasSetMathMode(h->blas, CUBLAS_DEFAULT_MATH);
    }
    if (bs != CUBLAS_STATUS_SUCCESS) {
        kc_blas_msg(err, errlen, bwhat, bs);
        kc_release(ctx);
        return -1;
    }
    /* cuBLASLt, for GEMMs with fused epilogues; MOEK_CUDA_NO_LT=1 keeps
     * them as separate kernels (the tests run both ways) */
    const char *no_lt = getenv("MOEK_CUDA_NO_LT");
    if (!(no_lt && *no_lt && strcmp(no_lt, "0"))) {
        bs = cublasLtCreate(&h->lt);
        if (bs != CUBLAS_STATUS_SUCCESS) {
            h->lt = nullptr;
            kc_blas_msg(err, errlen, "cublasLtCreate", bs);
            kc_release(ctx);
            return -1;
        }
    }
    return 0;
}

extern "C" void moek_device_fini(moek_ctx *ctx)
{
    if (!ctx)
        return;
    if (ctx->stream)
        cudaStreamSynchronize((cudaStream_t)ctx->stream);
    kc_release(ctx);
}

extern "C" void *moek_device_alloc(const moek_ctx *ctx, int64_t bytes, char *err, int64_t errlen)
{
    (void)ctx;
    if (bytes < 0) {
        snprintf(err, (size_t)errlen, "cuda device: negative allocation size %lld", (long long)bytes);
        return nullptr;
    }
    void *p = nullptr;
    size_t n = bytes > 0 ? (size_t)bytes : 1;
    cudaError_t e = cudaMalloc(&p, n);
    if (e != cudaSuccess) {
        char what[96];
        snprintf(what, sizeof what, "cudaMalloc of %lld bytes", (long long)bytes);
        kc_msg(err, errlen, what, e);
        return nullptr;
    }
    e = cudaMemset(p, 0, n);
    if (e != cudaSuccess) {
        kc_msg(err, errlen, "cudaMemset", e);
        cudaFree(p);
        return nullptr;
    }
    return p;
}

extern "C" void moek_device_free(const moek_ctx *ctx, void *p)
{
    (void)ctx;
    if (p)
        cudaFree(p);
}

extern "C" int moek_device_copy(const moek_ctx *ctx, void *dst, const void *src, int64_t bytes,
                                int64_t kind, char *err, int64_t errlen)
{
    static const cudaMemcpyKind kinds[3] = {cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost,
                                            cudaMemcpyDeviceToDevice};
    if (kind < MOEK_COPY_H2D || kind > MOEK_COPY_D2D) {
        snprintf(err, (size_t)errlen, "cuda device: unknown copy kind %lld", (long long)kind);
        return -1;
    }
    if (bytes < 0) {
        snprintf(err, (size_t)errlen, "cuda device: negative copy size %lld", (long long)bytes);
        return -1;
    }
    if (bytes == 0)
        return 0;
    cudaStream_t s = kc_stream(ctx);
    cudaError_t e = cudaMemcpyAsync(dst, src, (size_t)bytes, kinds[kind], s);
    /* the host buffer of an H2D or D2H copy may be pageable and reused by
     * the caller as soon as we return: wait for those */
    if (e == cudaSuccess && kind != MOEK_COPY_D2D)
        e = cudaStreamSynchronize(s);
    if (e != cudaSuccess) {
        kc_msg(err, errlen, "cudaMemcpyAsync", e);
        return -1;
    }
    return 0;
}

static const char *kc_status_name(int code)
{
    switch (code) {
    case MOEK_E_INDEX: return "MOEK_E_INDEX (an index read from data is out of range)";
    case MOEK_E_SHAPE: return "MOEK_E_SHAPE (a size argument is inconsistent)";
    case MOEK_E_DEVICE: return "MOEK_E_DEVICE (a CUDA call failed)";
    default: return "unknown error code";
    }
}

extern "C" int moek_device_sync(const moek_ctx *ctx, char *err, int64_t errlen)
{
    cudaError_t e = cudaStreamSynchronize(kc_stream(ctx));
    if (e != cudaSuccess) {
        kc_fail(ctx, MOEK_E_DEVICE);
        kc_msg(err, errlen, "cudaStreamSynchronize", e);
        return -1;
    }
    int *dst = kc_dev_status(ctx);
    if (dst) {
        int code = 0;
        e = cudaMemcpy(&code, dst, sizeof code, cudaMemcpyDeviceToHost);
        if (e == cudaSuccess && code != 0)
            e = cudaMemset(dst, 0, sizeof(int));   /* reported once */
        if (e != cudaSuccess) {
            kc_fail(ctx, MOEK_E_DEVICE);
            kc_msg(err, errlen, "reading the kernel status flag", e);
            return -1;
        }
        if (code != 0) {
            kc_fail(ctx, code);
            snprintf(err, (size_t)errlen, "cuda: a kernel found bad data: %s", kc_status_name(code));
            return -1;
        }
    }
    if (ctx && ctx->status && *ctx->status != 0) {
        snprintf(err, (size_t)errlen, "cuda: a kernel failed: %s", kc_status_name(*ctx->status));
        return -1;
    }
    return 0;
}

/* ---- CUDA graphs ---------------------------------------------------------
 * Relaxed capture: the runtime may call cudaMalloc-free host code between
 * ops while capturing; nothing in the kernels synchronises. */
extern "C" int moek_graph_begin(const moek_ctx *ctx, char *err, int64_t errlen)
{
    cudaError_t e = cudaStreamBeginCapture(kc_stream(ctx), cudaStreamCaptureModeRelaxed);
    if (e != cudaSuccess) {
        kc_msg(err, errlen, "cudaStreamBeginCapture", e);
        return -1;
    }
    return 0;
}

extern "C" int moek_graph_end(const moek_ctx *ctx, void **graph, char *err, int64_t errlen)
{
    if (graph)
        *graph = nullptr;
    cudaGraph_t g = nullptr;
    cudaError_t e = cudaStreamEndCapture(kc_stream(ctx), &g);
    if (e != cudaSuccess) {
        if (g)
            cudaGraphDestroy(g);
        kc_msg(err, errlen, "cudaStreamEndCapture", e);
        return -1;
    }
    if (ctx && ctx->status && *ctx->status != 0) {
        /* an op failed while being captured: the graph is incomplete */
        cudaGraphDestroy(g);
        snprintf(err, (size_t)errlen, "cuda: an op failed during capture: %s",
                 kc_status_name(*ctx->status));
        return -1;
    }
    cudaGraphExec_t x = nullptr;
    e = cudaGraphInstantiate(&x, g, 0);
    cudaGraphDestroy(g);
    if (e != cudaSuccess) {
        kc_msg(err, errlen, "cudaGraphInstantiate", e);
        return -1;
    }
    if (!graph) {
        cudaGraphExecDestroy(x);
        snprintf(err, (size_t)errlen, "cuda: no place to return the graph");
        return -1;
    }
    *graph = x;
    return 0;
}

extern "C" int moek_graph_launch(const moek_ctx *ctx, void *graph, char *err, int64_t errlen)
{
    if (!graph) {
        snprintf(err, (size_t)errlen, "cuda: no graph to launch");
        return -1;
    }
    cudaError_t e = cudaGraphLaunch((cudaGraphExec_t)graph, kc_stream(ctx));
    if (e != cudaSuccess) {
        kc_msg(err, errlen, "cudaGraphLaunch", e);
        return -1;
    }
    return 0;
}

extern "C" void moek_graph_free(void *graph)
{
    if (graph)
        cudaGraphExecDestroy((cudaGraphExec_t)graph);
}
