/* kcuda.cuh - helpers private to the CUDA kernels (kernels/cuda/).  Nothing
 * here is part of the ABI; moek.h is.
 *
 * Error model: a failing CUDA/cuBLAS call or launch sets *ctx->status to
 * MOEK_E_DEVICE on the host (first error wins).  Bad data found by a kernel
 * on the device (an index out of range) cannot reach a host int without a
 * sync, so kernels record it in a device flag owned by the handles below;
 * moek_device_sync reads that flag and moves it into *ctx->status. */
#ifndef KCUDA_CUH
#define KCUDA_CUH

#include <stdint.h>
#include <cuda_runtime.h>
#include <cublas_v2.h>
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

extern "C" {
#include "../moek.h"
}

/* A cuBLASLt algorithm chosen for one GEMM shape and epilogue (fused.cu),
 * so the heuristic runs once per shape, not at every call. */
struct kcuda_lt_plan {
    uint64_t key[4];        /* shape, types, epilogue, alignments; all 0 = empty */
    int usable;             /* 0: cuBLASLt offered nothing, use the unfused path */
    cublasLtMatmulAlgo_t algo;
};

#define KCUDA_LT_PLANS 32

/* What moek_device_init hangs on ctx->blas: the cuBLAS handle plus the few
 * device buffers the library keeps for itself. */
struct kcuda_handles {
    cublasHandle_t blas;
    cublasLtHandle_t lt;    /* NULL: fused epilogues run as separate kernels */
    kcuda_lt_plan lt_plans[KCUDA_LT_PLANS];
    int lt_next;            /* the plan slot to replace next */
    void *blas_ws;          /* cuBLAS workspace: fixed so graph capture never allocates */
    size_t blas_ws_bytes;
    int *dev_status;        /* first data error found on the device (0 = none) */
    double *scratch;        /* KCUDA_SCRATCH doubles for two-pass reductions */
};

#define KCUDA_SCRATCH 1024
#define KCUDA_THREADS 256

static inline kcuda_handles *kc_handles(const moek_ctx *ctx)
{
    return ctx ? (kcuda_handles *)ctx->blas : nullptr;
}

static inline cudaStream_t kc_stream(const moek_ctx *ctx)
{
    return ctx ? (cudaStream_t)ctx->stream : (cudaStream_t)0;
}

static inline int *kc_dev_status(const moek_ctx *ctx)
{
    kcuda_handles *h = kc_handles(ctx);
    return h ? h->dev_status : nullptr;
}

static inline void kc_fail(const moek_ctx *ctx, int code)
{
    if (ctx && ctx->status && *ctx->status == 0)
        *ctx->status = code;
}

/* true when e is success; otherwise records MOEK_E_DEVICE */
static inline bool kc_ok(const moek_ctx *ctx, cudaError_t e)
{
    if (e == cudaSuccess)
        return true;
    kc_fail(ctx, MOEK_E_DEVICE);
    return false;
}

static inline bool kc_blas_ok(const moek_ctx *ctx, cublasStatus_t s)
{
    if (s == CUBLAS_STATUS_SUCCESS)
        return true;
    kc_fail(ctx, MOEK_E_DEVICE);
    return false;
}

/* after every launch */
static inline bool kc_launched(const moek_ctx *ctx) { return kc_ok(ctx, cudaGetLastError()); }

/* size arguments: false (and MOEK_E_SHAPE) when cond does not hold */
static inline bool kc_shape(const moek_ctx *ctx, bool cond)
{
    if (!cond)
        kc_fail(ctx, MOEK_E_SHAPE);
    return cond;
}

/* zero n floats (or any bytes) on the stream */
static inline bool kc_zero(const moek_ctx *ctx, void *p, int64_t bytes)
{
    if (bytes <= 0)
        return true;
    return kc_ok(ctx, cudaMemsetAsync(p, 0, (size_t)bytes, kc_stream(ctx)));
}

/* blocks for a grid-stride loop over n items */
static inline unsigned kc_blocks(int64_t n, int threads = KCUDA_THREADS)
{
    int64_t b = (n + threads - 1) / threads;
    if (b > 65536)
        b = 65536;
    return (unsigned)(b < 1 ? 1 : b);
}

/* The cuBLAS type of a storage type.  fp32 storage with fp32 compute;
 * CUBLAS_COMPUTE_32F with the default math mode never rounds inputs to
 * TF32.  bf16 (fp16) storage: bf16 (fp16) A, B and C with the same fp32
 * compute type, which runs on the tensor cores and rounds C once. */
template <typename T> struct kc_blas_type;
template <> struct kc_blas_type<float> {
    static constexpr cudaDataType_t value = CUDA_R_32F;
};
template <> struct kc_blas_type<__nv_bfloat16> {
    static constexpr cudaDataType_t value = CUDA_R_16BF;
};
template <> struct kc_blas_type<__half> {
    static constexpr cudaDataType_t value = CUDA_R_16F;
};

/* ---- device side -------------------------------------------------------- */
__device__ inline void kc_dev_fail(int *st, int code)
{
    if (st)
        atomicCAS(st, 0, code);
}

/* Storage conversions: every kernel loads through kc_ld and stores through
 * kc_st and computes in fp32, so a bf16 variant is one more instantiation. */
template <typename T> __device__ inline float kc_ld(const T *p) { return (float)*p; }
template <typename T> __device__ inline void kc_st(T *p, float v) { *p = (T)v; }
/* bf16 storage: widening is exact; narrowing rounds to nearest even (NaN
 * stays NaN), as the CPU reference does, so the two libraries agree bit for
 * bit whenever their fp32 results do */
template <> __device__ inline float kc_ld<__nv_bfloat16>(const __nv_bfloat16 *p)
{
    return __bfloat162float(*p);
}
template <> __device__ inline void kc_st<__nv_bfloat16>(__nv_bfloat16 *p, float v)
{
    *p = __float2bfloat16_rn(v);
}

/* the ABI's moek_bf16 (raw uint16_t) is the same 16 bits as __nv_bfloat16 */
typedef __nv_bfloat16 kc_bf16;
static inline const kc_bf16 *kc_bf(const moek_bf16 *p) { return reinterpret_cast<const kc_bf16 *>(p); }
static inline kc_bf16 *kc_bf(moek_bf16 *p) { return reinterpret_cast<kc_bf16 *>(p); }

/* fp16 storage (precision = fp16): IEEE half, widened exactly and narrowed
 * round-to-nearest-even with overflow to Inf (__float2half_rn), as the CPU
 * reference (kernels/cpu/f16.h) does; moek_f16 is the same 16 bits */
template <> __device__ inline float kc_ld<__half>(const __half *p) { return __half2float(*p); }
template <> __device__ inline void kc_st<__half>(__half *p, float v) { *p = __float2half_rn(v); }
typedef __half kc_f16;
static inline const kc_f16 *kc_hf(const moek_f16 *p) { return reinterpret_cast<const kc_f16 *>(p); }
static inline kc_f16 *kc_hf(moek_f16 *p) { return reinterpret_cast<kc_f16 *>(p); }

__device__ inline float kc_warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ inline double kc_warp_sum_d(double v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ inline float kc_warp_max(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread
 * gets the result.  Fixed order, so deterministic.  shm: 32 floats. */
__device__ inline float kc_block_sum(float v, float *shm)
{
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = kc_warp_sum(v);
    __syncthreads();   /* shm may still be read by a previous call */
    if (lane == 0)
        shm[warp] = v;
    __syncthreads();
    float t = lane < nw ? shm[lane] : 0.0f;
    return kc_warp_sum(t);
}

__device__ inline double kc_block_sum_d(double v, double *shm)
{
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = kc_warp_sum_d(v);
    __syncthreads();
    if (lane == 0)
        shm[warp] = v;
    __syncthreads();
    double t = lane < nw ? shm[lane] : 0.0;
    return kc_warp_sum_d(t);
}

__device__ inline float kc_block_max(float v, float *shm)
{
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = kc_warp_max(v);
    __syncthreads();
    if (lane == 0)
        shm[warp] = v;
    __syncthreads();
    float t = lane < nw ? shm[lane] : -INFINITY;
    return kc_warp_max(t);
}

/* 16-byte asynchronous copy from global to shared memory (sm_80+): n bytes
 * read, the rest of the 16 zero-filled, so n = 0 writes zeros and reads
 * nothing; kc_cp_commit closes a group of copies; kc_cp_wait<N> waits
 * until at most N groups are still in flight.  The emulator (tests/
 * standin/cuemu.h) queues the copies and performs them at the wait, which
 * is as late as the hardware may. */
#ifdef MOEK_CUDA_EMULATED
__device__ inline void kc_cp16(void *dst, const void *src, int n) { cuemu_cp_async(dst, src, n); }
__device__ inline void kc_cp_commit() { cuemu_cp_commit(); }
template <int N> __device__ inline void kc_cp_wait() { cuemu_cp_wait(N); }
#else
__device__ inline void kc_cp16(void *dst, const void *src, int n)
{
    unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(n));
}
__device__ inline void kc_cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ inline void kc_cp_wait()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
#endif

#define KC_GRID_STRIDE(i, n)                                                        \
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n);       \
         i += (int64_t)gridDim.x * blockDim.x)

#endif
