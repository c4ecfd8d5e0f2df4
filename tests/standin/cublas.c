/* cublas.c - a stand-in for the part of cuBLAS and cuBLASLt the CUDA
 * kernel library uses (a handle bound to a stream and cublasGemmEx; a
 * cuBLASLt matmul with the BIAS, GELU_AUX_BIAS and BGRADB epilogues), for
 * the kernels run on the CPU by the emulator (cuemu.h).  Test code only.
 *
 * cublasGemmEx as documented: column-major C (m x n) = alpha op(A) op(B)
 * + beta C, A/B/C each fp32, bf16 or fp16, computed in fp32 (the only
 * compute type accepted is CUBLAS_COMPUTE_32F, the one the library uses,
 * so a change to TF32 or fp16 compute fails here instead of passing).
 * beta = 0 never reads C, which the tests fill with NaN.  The product runs
 * on the handle's stream, in order with the kernels, and is recorded
 * into a graph when that stream is being captured. */
#include <cublasLt.h>
#include <cublas_v2.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../kernels/moek.h"
#include "standin.h"

struct cublasContext {
    cudaStream_t stream;
};

/* a handle or descriptor: a struct of ours, zeroed or a copy of init */
static cublasStatus_t obj_new(void **out, const void *init, size_t bytes)
{
    *out = calloc(1, bytes);
    if (!*out)
        return CUBLAS_STATUS_ALLOC_FAILED;
    if (init)
        memcpy(*out, init, bytes);
    return CUBLAS_STATUS_SUCCESS;
}

static cublasStatus_t obj_free(void *h)
{
    if (!h)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    free(h);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasCreate_v2(cublasHandle_t *h)
{
    return obj_new((void **)h, NULL, sizeof **h);
}

cublasStatus_t cublasDestroy_v2(cublasHandle_t h)
{
    return obj_free(h);
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

/* alpha op(A)(row, :) . op(B)(:, col) + beta C(row, col), column-major,
 * summed in fp32 over k in order */
static float gemm_at(const gemm_job *j, int row, int col)
{
    float acc = 0.0f;
    for (int p = 0; p < j->k; p++) {
        int64_t ia = j->ta ? (int64_t)row * j->lda + p : (int64_t)p * j->lda + row;
        int64_t ib = j->tb ? (int64_t)p * j->ldb + col : (int64_t)col * j->ldb + p;
        acc += ld(j->a, j->at, ia) * ld(j->b, j->bt, ib);
    }
    float v = j->alpha * acc;
    if (j->beta != 0.0f)
        v += j->beta * ld(j->c, j->ct, (int64_t)col * j->ldc + row);
    return v;
}

static void run_gemm(void *arg)
{
    const gemm_job *j = arg;
    for (int col = 0; col < j->n; col++)
        for (int row = 0; row < j->m; row++)
            st(j->c, j->ct, (int64_t)col * j->ldc + row, gemm_at(j, row, col));
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

/* ---- cuBLASLt ---------------------------------------------------------------
 * As cublasLt.h documents them: column-major D (m x n) = alpha op(A) op(B)
 * (+ beta C, with C = D here), then the epilogue:
 *  - BIAS: + bias[row] (bias length = D's rows);
 *  - GELU_AUX_BIAS: v = acc + bias[row]; aux (leading dimension AUX_LD,
 *    divisible by 8 and >= m) = v; D = GELU(v), the tanh form;
 *  - BGRADB: D as DEFAULT; bias[col] = the sum of op(B)'s column over k.
 * Any other epilogue is NOT_SUPPORTED, so is an alignment under 16 bytes
 * (the library then takes its unfused path, which the tests check too).
 * The descriptors are our own structs behind cuBLASLt's opaque pointers. */
typedef struct lt_desc {
    cublasComputeType_t compute;
    cudaDataType scale;
    int32_t ta, tb;
    uint32_t epilogue;
    void *vec, *aux;
    int64_t aux_ld;
} lt_desc;

typedef struct lt_layout {
    cudaDataType type;
    uint64_t rows, cols;
    int64_t ld;
} lt_layout;

typedef struct lt_pref {
    uint64_t workspace;
    uint32_t align[4];   /* A, B, C, D */
} lt_pref;

struct cublasLtContext {
    int live;
};

#define LT_DESC(p) ((lt_desc *)(void *)(p))
#define LT_LAYOUT(p) ((const lt_layout *)(const void *)(p))

cublasStatus_t cublasLtCreate(cublasLtHandle_t *h)
{
    return obj_new((void **)h, NULL, sizeof **h);
}

cublasStatus_t cublasLtDestroy(cublasLtHandle_t h)
{
    return obj_free(h);
}

cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *d, cublasComputeType_t compute, cudaDataType_t scale)
{
    lt_desc x = {.compute = compute, .scale = scale, .ta = CUBLAS_OP_N, .tb = CUBLAS_OP_N,
                 .epilogue = CUBLASLT_EPILOGUE_DEFAULT};
    return obj_new((void **)d, &x, sizeof x);
}

cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d)
{
    return obj_free(d);
}

static cublasStatus_t lt_set(void *dst, size_t want, const void *buf, size_t size)
{
    if (size != want)
        return CUBLAS_STATUS_INVALID_VALUE;
    memcpy(dst, buf, size);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t attr,
                                              const void *buf, size_t size)
{
    lt_desc *x = LT_DESC(d);
    switch (attr) {
    case CUBLASLT_MATMUL_DESC_TRANSA: return lt_set(&x->ta, sizeof x->ta, buf, size);
    case CUBLASLT_MATMUL_DESC_TRANSB: return lt_set(&x->tb, sizeof x->tb, buf, size);
    case CUBLASLT_MATMUL_DESC_EPILOGUE: return lt_set(&x->epilogue, sizeof x->epilogue, buf, size);
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER: return lt_set(&x->vec, sizeof x->vec, buf, size);
    case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER: return lt_set(&x->aux, sizeof x->aux, buf, size);
    case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD: return lt_set(&x->aux_ld, sizeof x->aux_ld, buf, size);
    default: return CUBLAS_STATUS_NOT_SUPPORTED;   /* nothing else is emulated */
    }
}

cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *l, cudaDataType type, uint64_t rows,
                                          uint64_t cols, int64_t ld)
{
    lt_layout x = {type, rows, cols, ld};
    return obj_new((void **)l, &x, sizeof x);
}

cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l)
{
    return obj_free(l);
}

cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t *p)
{
    lt_pref x = {0, {256, 256, 256, 256}};   /* cuBLASLt's default alignments */
    return obj_new((void **)p, &x, sizeof x);
}

cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t p)
{
    return obj_free(p);
}

cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t p,
                                                    cublasLtMatmulPreferenceAttributes_t attr, const void *buf,
                                                    size_t size)
{
    lt_pref *x = (lt_pref *)(void *)p;
    switch (attr) {
    case CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES: return lt_set(&x->workspace, sizeof x->workspace, buf, size);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES: return lt_set(&x->align[0], sizeof *x->align, buf, size);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES: return lt_set(&x->align[1], sizeof *x->align, buf, size);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES: return lt_set(&x->align[2], sizeof *x->align, buf, size);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES: return lt_set(&x->align[3], sizeof *x->align, buf, size);
    default: return CUBLAS_STATUS_NOT_SUPPORTED;
    }
}

/* the documented shape rules: SUCCESS, INVALID_VALUE or NOT_SUPPORTED */
static cublasStatus_t lt_check(const lt_desc *d, const lt_layout *a, const lt_layout *b, const lt_layout *c,
                               const lt_layout *dl)
{
    if (d->compute != CUBLAS_COMPUTE_32F || d->scale != CUDA_R_32F || !known(a->type) || a->type != b->type ||
        a->type != c->type || a->type != dl->type)
        return CUBLAS_STATUS_NOT_SUPPORTED;
    uint64_t m = dl->rows, n = dl->cols;
    uint64_t am = d->ta != CUBLAS_OP_N ? a->cols : a->rows, ak = d->ta != CUBLAS_OP_N ? a->rows : a->cols;
    uint64_t bk = d->tb != CUBLAS_OP_N ? b->cols : b->rows, bn = d->tb != CUBLAS_OP_N ? b->rows : b->cols;
    if (am != m || bn != n || ak != bk || c->rows != m || c->cols != n)
        return CUBLAS_STATUS_INVALID_VALUE;
    if (a->ld < (int64_t)a->rows || b->ld < (int64_t)b->rows || dl->ld < (int64_t)m || c->ld != dl->ld)
        return CUBLAS_STATUS_INVALID_VALUE;
    switch (d->epilogue) {
    case CUBLASLT_EPILOGUE_DEFAULT:
    case CUBLASLT_EPILOGUE_BIAS:
    case CUBLASLT_EPILOGUE_BGRADB: return CUBLAS_STATUS_SUCCESS;
    case CUBLASLT_EPILOGUE_GELU_AUX_BIAS:
        return d->aux_ld % 8 == 0 && d->aux_ld >= (int64_t)m ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_INVALID_VALUE;
    default: return CUBLAS_STATUS_NOT_SUPPORTED;
    }
}

cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t h, cublasLtMatmulDesc_t op,
                                              cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                                              cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t d,
                                              cublasLtMatmulPreference_t pref, int requested,
                                              cublasLtMatmulHeuristicResult_t *out, int *found)
{
    *found = 0;
    if (!h)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    if (requested < 1)
        return CUBLAS_STATUS_INVALID_VALUE;
    cublasStatus_t s = lt_check(LT_DESC(op), LT_LAYOUT(a), LT_LAYOUT(b), LT_LAYOUT(c), LT_LAYOUT(d));
    if (s != CUBLAS_STATUS_SUCCESS)
        return s;
    const lt_pref *p = (const lt_pref *)(const void *)pref;
    for (int i = 0; i < 4; i++)
        if (p->align[i] < 16)   /* the one emulated algorithm wants 16-byte operands */
            return CUBLAS_STATUS_NOT_SUPPORTED;
    memset(out, 0, sizeof *out);
    out->state = CUBLAS_STATUS_SUCCESS;
    out->wavesCount = 1.0f;
    *found = 1;
    return CUBLAS_STATUS_SUCCESS;
}

typedef struct lt_job {
    gemm_job g;         /* the product, as cublasGemmEx's */
    uint32_t epilogue;
    void *vec, *aux;
    int64_t aux_ld;
} lt_job;

static float lt_gelu(float v)
{
    return 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
}

static void run_lt(void *arg)
{
    const lt_job *j = arg;
    const gemm_job *g = &j->g;
    for (int col = 0; col < g->n; col++)
        for (int row = 0; row < g->m; row++) {
            float v = gemm_at(g, row, col);
            if (j->epilogue == CUBLASLT_EPILOGUE_BIAS || j->epilogue == CUBLASLT_EPILOGUE_GELU_AUX_BIAS)
                v += ld(j->vec, g->ct, row);
            if (j->epilogue == CUBLASLT_EPILOGUE_GELU_AUX_BIAS) {
                st(j->aux, g->ct, (int64_t)col * j->aux_ld + row, v);
                v = lt_gelu(v);
            }
            st(g->c, g->ct, (int64_t)col * g->ldc + row, v);
        }
    if (j->epilogue == CUBLASLT_EPILOGUE_BGRADB)
        for (int col = 0; col < g->n; col++) {
            float sum = 0.0f;
            for (int p = 0; p < g->k; p++)
                sum += ld(g->b, g->bt, g->tb ? (int64_t)p * g->ldb + col : (int64_t)col * g->ldb + p);
            st(j->vec, g->ct, col, sum);
        }
}

cublasStatus_t cublasLtMatmul(cublasLtHandle_t h, cublasLtMatmulDesc_t op, const void *alpha, const void *A,
                              cublasLtMatrixLayout_t a, const void *B, cublasLtMatrixLayout_t b, const void *beta,
                              const void *C, cublasLtMatrixLayout_t c, void *D, cublasLtMatrixLayout_t d,
                              const cublasLtMatmulAlgo_t *algo, void *ws, size_t ws_bytes, cudaStream_t stream)
{
    (void)algo;
    (void)ws;
    (void)ws_bytes;
    if (!h)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    const lt_desc *x = LT_DESC(op);
    const lt_layout *la = LT_LAYOUT(a), *lb = LT_LAYOUT(b), *ld_ = LT_LAYOUT(d);
    cublasStatus_t s = lt_check(x, la, lb, LT_LAYOUT(c), ld_);
    if (s != CUBLAS_STATUS_SUCCESS)
        return s;
    if (C != D)   /* the library always accumulates in place */
        return CUBLAS_STATUS_NOT_SUPPORTED;
    int bias = x->epilogue != CUBLASLT_EPILOGUE_DEFAULT;
    if ((bias && !x->vec) || (x->epilogue == CUBLASLT_EPILOGUE_GELU_AUX_BIAS && !x->aux))
        return CUBLAS_STATUS_INVALID_VALUE;
    lt_job *j = malloc(sizeof *j);
    if (!j)
        return CUBLAS_STATUS_ALLOC_FAILED;
    int ta = x->ta != CUBLAS_OP_N;
    *j = (lt_job){.g = {.ta = ta, .tb = x->tb != CUBLAS_OP_N, .m = (int)ld_->rows, .n = (int)ld_->cols,
                        .k = (int)(ta ? la->rows : la->cols), .lda = (int)la->ld, .ldb = (int)lb->ld,
                        .ldc = (int)ld_->ld, .alpha = *(const float *)alpha, .beta = *(const float *)beta,
                        .a = A, .b = B, .c = D, .at = la->type, .bt = lb->type, .ct = ld_->type},
                  .epilogue = x->epilogue, .vec = x->vec, .aux = x->aux, .aux_ld = x->aux_ld};
    if (standin_enqueue(stream, run_lt, j, free))
        return CUBLAS_STATUS_ALLOC_FAILED;
    return CUBLAS_STATUS_SUCCESS;
}
