/* cublas.c - a stand-in for the part of cuBLAS the CUDA kernel library
 * uses (a handle bound to a stream, and cublasGemmEx), for the kernels run
 * on the CPU by the emulator (cuemu.h).  Test code only.
 *
 * cublasGemmEx as documented: column-major C (m x n) = alpha op(A) op(B)
 * + beta C, A/B/C each fp32, bf16 or fp16, computed in fp32 (the only
 * compute type accepted is CUBLAS_COMPUTE_32F, the one the library uses,
 * so a change to TF32 or fp16 compute fails here instead of passing).
 * beta = 0 never reads C, which the tests fill with NaN.  The product runs
 * on the handle's stream, in order with the kernels, and is recorded
 * into a graph when that stream is being captured. */
#include <cublas_v2.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../kernels/moek.h"
#include "standin.h"

struct cublasContext {
    cudaStream_t stream;
};

cublasStatus_t cublasCreate_v2(cublasHandle_t *h)
{
    *h = calloc(1, sizeof **h);
    return *h ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_ALLOC_FAILED;
}

cublasStatus_t cublasDestroy_v2(cublasHandle_t h)
{
    if (!h)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    free(h);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream_v2(cublasHandle_t h, cudaStream_t s)
{
    if (!h)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    h->stream = s;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t h, void *ws, size_t bytes)
{
    (void)ws;
    (void)bytes;
    return h ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_NOT_INITIALIZED;
}

cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t mode)
{
    if (!h)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    return mode == CUBLAS_DEFAULT_MATH ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_NOT_SUPPORTED;
}

const char *cublasGetStatusString(cublasStatus_t s)
{
    switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS (stand-in)";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED (stand-in)";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED (stand-in)";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE (stand-in)";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED (stand-in)";
    default: return "cuBLAS error (stand-in)";
    }
}

typedef struct gemm_job {
    int ta, tb, m, n, k, lda, ldb, ldc;
    float alpha, beta;
    const void *a, *b;
    void *c;
    cudaDataType at, bt, ct;
} gemm_job;

static float ld(const void *p, cudaDataType t, int64_t i)
{
    switch (t) {
    case CUDA_R_16BF: return moek_bf16_to_f32(((const moek_bf16 *)p)[i]);
    case CUDA_R_16F: return moek_f16_to_f32(((const moek_f16 *)p)[i]);
    default: return ((const float *)p)[i];
    }
}

static void st(void *p, cudaDataType t, int64_t i, float v)
{
    switch (t) {
    case CUDA_R_16BF: ((moek_bf16 *)p)[i] = moek_bf16_from_f32(v); break;
    case CUDA_R_16F: ((moek_f16 *)p)[i] = moek_f16_from_f32(v); break;
    default: ((float *)p)[i] = v; break;
    }
}

static void run_gemm(void *arg)
{
    const gemm_job *j = arg;
    for (int col = 0; col < j->n; col++)
        for (int row = 0; row < j->m; row++) {
            float acc = 0.0f;
            for (int p = 0; p < j->k; p++) {
                /* op(A)(row, p) and op(B)(p, col), column-major */
                int64_t ia = j->ta ? (int64_t)row * j->lda + p : (int64_t)p * j->lda + row;
                int64_t ib = j->tb ? (int64_t)p * j->ldb + col : (int64_t)col * j->ldb + p;
                acc += ld(j->a, j->at, ia) * ld(j->b, j->bt, ib);
            }
            int64_t ic = (int64_t)col * j->ldc + row;
            float v = j->alpha * acc;
            if (j->beta != 0.0f)
                v += j->beta * ld(j->c, j->ct, ic);
            st(j->c, j->ct, ic, v);
        }
}

static int known(cudaDataType t)
{
    return t == CUDA_R_32F || t == CUDA_R_16BF || t == CUDA_R_16F;
}

cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t transa, cublasOperation_t transb,
                            int m, int n, int k, const void *alpha, const void *A,
                            cudaDataType Atype, int lda, const void *B, cudaDataType Btype, int ldb,
                            const void *beta, void *C, cudaDataType Ctype, int ldc,
                            cublasComputeType_t computeType, cublasGemmAlgo_t algo)
{
    (void)algo;
    if (!h)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    int ta = transa != CUBLAS_OP_N, tb = transb != CUBLAS_OP_N;
    if (m < 0 || n < 0 || k < 0 || !alpha || !beta)
        return CUBLAS_STATUS_INVALID_VALUE;
    /* the leading dimensions of the stored (not transposed) matrices */
    int arows = ta ? k : m, brows = tb ? n : k;
    if (lda < (arows > 1 ? arows : 1) || ldb < (brows > 1 ? brows : 1) || ldc < (m > 1 ? m : 1))
        return CUBLAS_STATUS_INVALID_VALUE;
    if (computeType != CUBLAS_COMPUTE_32F || !known(Atype) || !known(Btype) || !known(Ctype))
        return CUBLAS_STATUS_NOT_SUPPORTED;
    if (m == 0 || n == 0)
        return CUBLAS_STATUS_SUCCESS;
    gemm_job *j = malloc(sizeof *j);
    if (!j)
        return CUBLAS_STATUS_ALLOC_FAILED;
    *j = (gemm_job){.ta = ta, .tb = tb, .m = m, .n = n, .k = k, .lda = lda, .ldb = ldb,
                    .ldc = ldc, .alpha = *(const float *)alpha, .beta = *(const float *)beta,
                    .a = A, .b = B, .c = C, .at = Atype, .bt = Btype, .ct = Ctype};
    if (standin_enqueue(h->stream, run_gemm, j, free))
        return CUBLAS_STATUS_ALLOC_FAILED;
    return CUBLAS_STATUS_SUCCESS;
}
