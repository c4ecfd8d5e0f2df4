/* fused.cu - the fused ops of kernels/moek.h (issue 8).  Twin of
 * kernels/cpu/fused.c: the same maths in the same rounding steps, with the
 * norm statistics in double as in norm.cu.  Residual add + RMSNorm reads a
 * and b once and writes s and y in one kernel (unfused: add writes s, the
 * norm reads it back twice); its backward adds the residual gradient ds in
 * the same pass that writes the norm's dx. */
#include <string.h>

#include "kcuda.cuh"

/* v stored in T and read back: where the unfused ops round */
template <typename T> __device__ inline float kfu_rt(float v)
{
    T t;
    kc_st(&t, v);
    return kc_ld(&t);
}

/* one block per row: s = a + b, rstd from the stored s, y = s r w */
template <typename T>
__global__ void k_add_rmsnorm_fwd(const T *a, const T *b, const T *w, T *s, T *y, float *rstd, int64_t D,
                                  float eps)
{
    __shared__ double shm[32];
    int64_t n = blockIdx.x;
    const T *ar = a + n * D, *br = b + n * D;
    T *sr = s + n * D, *yr = y + n * D;
    double ss = 0.0;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        double v = kfu_rt<T>(kc_ld(ar + d) + kc_ld(br + d));
        kc_st(sr + d, (float)v);
        ss += v * v;
    }
    ss = kc_block_sum_d(ss, shm);
    float r = (float)(1.0 / sqrt(ss / (double)(D > 0 ? D : 1) + (double)eps));
    if (threadIdx.x == 0)
        rstd[n] = r;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x)   /* each thread reads back what it wrote */
        kc_st(yr + d, kc_ld(sr + d) * r * kc_ld(w + d));
}

/* one block per row: dx as moek_rmsnorm_bwd, then da = db = dx + ds */
template <typename T>
__global__ void k_add_rmsnorm_bwd_dx(const T *dy, const T *ds, const T *s, const T *w, const float *rstd, T *da,
                                     T *db, int64_t D)
{
    __shared__ double shm[32];
    int64_t n = blockIdx.x;
    const T *sr = s + n * D, *dyr = dy + n * D, *dsr = ds + n * D;
    double dot = 0.0;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
        dot += (double)kc_ld(dyr + d) * kc_ld(w + d) * kc_ld(sr + d);
    dot = kc_block_sum_d(dot, shm);
    double r = rstd[n];
    double c = r * r * dot / (double)(D > 0 ? D : 1);
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        float dx = kfu_rt<T>((float)(r * ((double)kc_ld(w + d) * kc_ld(dyr + d) - kc_ld(sr + d) * c)));
        float g = dx + kc_ld(dsr + d);
        kc_st(da + n * D + d, g);
        kc_st(db + n * D + d, g);
    }
}

/* dw_d = sum_n dy s r, one thread per column over the rows in order */
template <typename T>
__global__ void k_add_rmsnorm_bwd_dw(const T *dy, const T *s, const float *rstd, T *dw, int64_t N, int64_t D)
{
    KC_GRID_STRIDE(d, D) {
        double acc = 0.0;
        for (int64_t n = 0; n < N; n++)
            acc += (double)kc_ld(dy + n * D + d) * kc_ld(s + n * D + d) * (double)rstd[n];
        kc_st(dw + d, (float)acc);
    }
}

template <typename T>
static void kfu_add_rmsnorm_fwd(const moek_ctx *ctx, const T *a, const T *b, const T *w, T *s, T *y, float *rstd,
                                int64_t N, int64_t D, float eps)
{
    if (!kc_shape(ctx, N >= 0 && D >= 0 && N <= INT32_MAX) || N == 0)
        return;
    k_add_rmsnorm_fwd<T><<<(unsigned)N, KCUDA_THREADS, 0, kc_stream(ctx)>>>(a, b, w, s, y, rstd, D, eps);
    kc_launched(ctx);
}

template <typename T>
static void kfu_add_rmsnorm_bwd(const moek_ctx *ctx, const T *dy, const T *ds, const T *s, const T *w,
                                const float *rstd, T *da, T *db, T *dw, int64_t N, int64_t D)
{
    if (!kc_shape(ctx, N >= 0 && D >= 0 && N <= INT32_MAX))
        return;
    if (N > 0) {
        k_add_rmsnorm_bwd_dx<T><<<(unsigned)N, KCUDA_THREADS, 0, kc_stream(ctx)>>>(dy, ds, s, w, rstd, da, db, D);
        if (!kc_launched(ctx))
            return;
    }
    if (D > 0) {
        k_add_rmsnorm_bwd_dw<T><<<kc_blocks(D, 128), 128, 0, kc_stream(ctx)>>>(dy, s, rstd, dw, N, D);
        kc_launched(ctx);
    }
}

extern "C" void moek_add_rmsnorm_fwd(const moek_ctx *ctx, const float *a, const float *b, const float *w, float *s,
                                     float *y, float *rstd, int64_t N, int64_t D, float eps)
{
    kfu_add_rmsnorm_fwd(ctx, a, b, w, s, y, rstd, N, D, eps);
}

extern "C" void moek_add_rmsnorm_bwd(const moek_ctx *ctx, const float *dy, const float *ds, const float *s,
                                     const float *w, const float *rstd, float *da, float *db, float *dw,
                                     int64_t N, int64_t D)
{
    kfu_add_rmsnorm_bwd(ctx, dy, ds, s, w, rstd, da, db, dw, N, D);
}

extern "C" void moek_add_rmsnorm_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *a, const moek_bf16 *b,
                                          const moek_bf16 *w, moek_bf16 *s, moek_bf16 *y, float *rstd,
                                          int64_t N, int64_t D, float eps)
{
    kfu_add_rmsnorm_fwd(ctx, kc_bf(a), kc_bf(b), kc_bf(w), kc_bf(s), kc_bf(y), rstd, N, D, eps);
}

extern "C" void moek_add_rmsnorm_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, const moek_bf16 *ds,
                                          const moek_bf16 *s, const moek_bf16 *w, const float *rstd,
                                          moek_bf16 *da, moek_bf16 *db, moek_bf16 *dw, int64_t N, int64_t D)
{
    kfu_add_rmsnorm_bwd(ctx, kc_bf(dy), kc_bf(ds), kc_bf(s), kc_bf(w), rstd, kc_bf(da), kc_bf(db), kc_bf(dw),
                        N, D);
}

extern "C" void moek_add_rmsnorm_fwd_f16(const moek_ctx *ctx, const moek_f16 *a, const moek_f16 *b,
                                         const moek_f16 *w, moek_f16 *s, moek_f16 *y, float *rstd,
                                         int64_t N, int64_t D, float eps)
{
    kfu_add_rmsnorm_fwd(ctx, kc_hf(a), kc_hf(b), kc_hf(w), kc_hf(s), kc_hf(y), rstd, N, D, eps);
}

extern "C" void moek_add_rmsnorm_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, const moek_f16 *ds,
                                         const moek_f16 *s, const moek_f16 *w, const float *rstd,
                                         moek_f16 *da, moek_f16 *db, moek_f16 *dw, int64_t N, int64_t D)
{
    kfu_add_rmsnorm_bwd(ctx, kc_hf(dy), kc_hf(ds), kc_hf(s), kc_hf(w), rstd, kc_hf(da), kc_hf(db), kc_hf(dw),
                        N, D);
}

/* ---- SwiGLU with its projections; router softmax + top-k -----------------
 * Composed of this library's own kernels, in the unfused order and storage
 * type, so each result equals the unfused ops' bit for bit and the CPU twin
 * (kernels/cpu/fused.c) within the tolerance of those kernels.  One plan op
 * instead of three (four in backward); the GEMMs are not yet epilogue-fused.
 * Scratch (dgate, dup, the first dx) comes from ctx->workspace. */
#define KFU_PROJ(SFX, T)                                                                                        \
    extern "C" void moek_swiglu_proj_fwd##SFX(const moek_ctx *ctx, const T *x, const T *w1, const T *w3,       \
                                              T *gate, T *up, T *y, int64_t N, int64_t K, int64_t M)          \
    {                                                                                                           \
        moek_matmul_fwd##SFX(ctx, x, w1, gate, N, K, M);                                                        \
        moek_matmul_fwd##SFX(ctx, x, w3, up, N, K, M);                                                          \
        moek_swiglu_fwd##SFX(ctx, gate, up, y, N * M);                                                          \
    }                                                                                                           \
    extern "C" void moek_swiglu_proj_bwd##SFX(const moek_ctx *ctx, const T *dy, const T *x, const T *w1,       \
                                              const T *w3, const T *gate, const T *up, T *dx, T *dw1, T *dw3,  \
                                              int64_t N, int64_t K, int64_t M)                                  \
    {                                                                                                           \
        if (!kc_shape(ctx, N >= 0 && K >= 0 && M >= 0))                                                         \
            return;                                                                                             \
        size_t nm = (size_t)(N * M) * sizeof(T), nk = (size_t)(N * K) * sizeof(T);                              \
        size_t at1 = (nm + 255) & ~(size_t)255, at2 = at1 + ((nm + 255) & ~(size_t)255);                        \
        if (!kc_shape(ctx, ctx->workspace && (size_t)ctx->workspace_bytes >= at2 + nk))                         \
            return;                                                                                             \
        char *ws = (char *)ctx->workspace;                                                                      \
        T *dg = (T *)ws, *du = (T *)(ws + at1), *dx1 = (T *)(ws + at2);                                         \
        moek_swiglu_bwd##SFX(ctx, dy, gate, up, dg, du, N * M);                                                 \
        moek_matmul_bwd##SFX(ctx, dg, x, w1, dx1, dw1, N, K, M);                                                \
        moek_matmul_bwd##SFX(ctx, du, x, w3, dx, dw3, N, K, M);                                                 \
        moek_add_fwd##SFX(ctx, dx1, dx, dx, N * K);                                                             \
    }                                                                                                           \
    extern "C" void moek_softmax_topk_fwd##SFX(const moek_ctx *ctx, const T *logits, float *probs,             \
                                               int32_t *idx, float *gates, int64_t N, int64_t E, int64_t k,    \
                                               int64_t renorm)                                                  \
    {                                                                                                           \
        moek_softmax_fwd##SFX(ctx, logits, probs, N, E);                                                        \
        moek_topk_fwd(ctx, probs, idx, gates, N, E, k, renorm);                                                 \
    }                                                                                                           \
    extern "C" void moek_softmax_topk_bwd##SFX(const moek_ctx *ctx, const float *dprobs, const float *dgates,  \
                                               const float *probs, const int32_t *idx, T *dlogits, int64_t N,  \
                                               int64_t E, int64_t k, int64_t renorm)                            \
    {                                                                                                           \
        if (!kc_shape(ctx, N >= 0 && E >= 0))                                                                   \
            return;                                                                                             \
        size_t ne = (size_t)(N * E) * sizeof(float);                                                            \
        if (!kc_shape(ctx, ctx->workspace && (size_t)ctx->workspace_bytes >= ne))                               \
            return;                                                                                             \
        float *sum = (float *)ctx->workspace;                                                                   \
        moek_topk_bwd(ctx, dgates, probs, idx, sum, N, E, k, renorm);                                           \
        moek_add_fwd(ctx, sum, dprobs, sum, N * E);                                                             \
        moek_softmax_bwd##SFX(ctx, sum, probs, dlogits, N, E);                                                  \
    }

KFU_PROJ(, float)
KFU_PROJ(_bf16, moek_bf16)
KFU_PROJ(_f16, moek_f16)

/* ---- a linear layer with its bias (and GELU) ------------------------------
 * The library's GEMM, then one epilogue kernel instead of bias_add and gelu:
 * pre += b (stored, as bias_add stores it), y = gelu(pre).  Backward: one
 * kernel per column writes dpre = dy gelu'(pre) (stored in T, as gelu_bwd
 * stores it) and sums it into db in double down the rows (as bias_add_bwd);
 * then the GEMM backward on dpre.  Without GELU (matmul_bias) the same two
 * kernels skip the activation, and db is summed from dy.  GELU is the tanh
 * form of elementwise.cu; dpre is scratch from ctx->workspace. */
#define KFU_GELU_C 0.7978845608028654f   /* sqrt(2/pi) */
#define KFU_GELU_A 0.044715f

__device__ inline float kfu_gelu(float v)
{
    float u = KFU_GELU_C * (v + KFU_GELU_A * v * v * v);
    return 0.5f * v * (1.0f + tanhf(u));
}

__device__ inline float kfu_gelu_grad(float v)
{
    float u = KFU_GELU_C * (v + KFU_GELU_A * v * v * v);
    float t = tanhf(u);
    float du = KFU_GELU_C * (1.0f + 3.0f * KFU_GELU_A * v * v);
    return 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * du;
}

/* pre = stored(pre + b); y = gelu(pre) when y is set */
template <typename T> __global__ void k_bias_gelu_fwd(T *pre, const T *b, T *y, int64_t N, int64_t M)
{
    KC_GRID_STRIDE(i, N * M) {
        float v = kfu_rt<T>(kc_ld(pre + i) + kc_ld(b + i % M));
        kc_st(pre + i, v);
        if (y)
            kc_st(y + i, kfu_gelu(v));
    }
}

/* one thread per column: dpre = stored(dy gelu'(pre)) (dy itself when pre
 * is NULL), db = the column's sum in double */
template <typename T> __global__ void k_gelu_bgrad(const T *dy, const T *pre, T *dpre, T *db, int64_t N, int64_t M)
{
    KC_GRID_STRIDE(d, M) {
        double acc = 0.0;
        for (int64_t n = 0; n < N; n++) {
            int64_t i = n * M + d;
            float g = kc_ld(dy + i);
            if (pre) {
                g = kfu_rt<T>(g * kfu_gelu_grad(kc_ld(pre + i)));
                kc_st(dpre + i, g);
            }
            acc += (double)g;
        }
        kc_st(db + d, (float)acc);
    }
}

/* dpre = stored(dy gelu'(pre)), every element in parallel (the bias
 * gradient is then summed by cuBLASLt, in the weight-gradient GEMM) */
template <typename T> __global__ void k_gelu_dpre(const T *dy, const T *pre, T *dpre, int64_t n)
{
    KC_GRID_STRIDE(i, n) {
        kc_st(dpre + i, kfu_rt<T>(kc_ld(dy + i) * kfu_gelu_grad(kc_ld(pre + i))));
    }
}

template <typename T>
static bool kfu_bias_gelu_fwd(const moek_ctx *ctx, T *pre, const T *b, T *y, int64_t N, int64_t M)
{
    if (N * M == 0)
        return true;
    k_bias_gelu_fwd<T><<<kc_blocks(N * M), KCUDA_THREADS, 0, kc_stream(ctx)>>>(pre, b, y, N, M);
    return kc_launched(ctx);
}

template <typename T>
static bool kfu_gelu_bgrad(const moek_ctx *ctx, const T *dy, const T *pre, T *dpre, T *db, int64_t N, int64_t M)
{
    if (M == 0)
        return true;
    k_gelu_bgrad<T><<<kc_blocks(M, 128), 128, 0, kc_stream(ctx)>>>(dy, pre, dpre, db, N, M);
    return kc_launched(ctx);
}

/* ---- the same ops as one cuBLASLt GEMM with its epilogue ------------------
 * Row-major y[N][M] = x[N][K] W^T is, column-major, y (M x N, ld M) =
 * op_T(W: K x M, ld K) . x (K x N, ld K): D has M rows, and the bias (M) is
 * cuBLASLt's per-row bias.  Forward: BIAS (D = y), or GELU_AUX_BIAS (D = y,
 * aux = pre with leading dimension M, which cuBLASLt wants divisible by 8).
 * Weight gradient: dw (K x M, ld K) = x (K x N, ld K) . op_T(dpre: M x N,
 * ld M), and BGRADB sums B = dpre over k = N into db (M = D's columns).
 * GELU is the tanh form, as here.  An epilogue rounds once where the
 * unfused ops round twice (bf16/fp16: GEMM output, then + bias), which
 * the tests' half tolerance covers; fp32 differs by summation order only.
 * When cuBLASLt has no algorithm for a case (or MOEK_CUDA_NO_LT is set),
 * the separate kernels above run instead. */
enum kfu_lt_kind { KFU_LT_BIAS, KFU_LT_GELU_AUX_BIAS, KFU_LT_BGRADB };

struct kfu_lt_gemm {
    kfu_lt_kind kind;
    cudaDataType_t type;
    cublasOperation_t ta, tb;
    int64_t m, n, k, lda, ldb, ldd;
    const void *a, *b;
    void *d;
    void *vec;   /* the bias (forward) or the bias gradient (BGRADB) */
    void *aux;   /* GELU_AUX_BIAS: the GELU input */
};

/* the largest power of two (up to 256) dividing the address: cuBLASLt's
 * algorithms each need some alignment, and the heuristic is told ours */
static uint32_t kfu_align(const void *p)
{
    uintptr_t u = (uintptr_t)p | 256u;
    return (uint32_t)(u & (~u + 1));
}

static uint32_t kfu_epilogue(kfu_lt_kind kind)
{
    switch (kind) {
    case KFU_LT_BIAS: return CUBLASLT_EPILOGUE_BIAS;
    case KFU_LT_GELU_AUX_BIAS: return CUBLASLT_EPILOGUE_GELU_AUX_BIAS;
    default: return CUBLASLT_EPILOGUE_BGRADB;
    }
}

/* the descriptors of one GEMM, freed with it */
struct kfu_lt_desc {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
    ~kfu_lt_desc()
    {
        if (d)
            cublasLtMatrixLayoutDestroy(d);
        if (b)
            cublasLtMatrixLayoutDestroy(b);
        if (a)
            cublasLtMatrixLayoutDestroy(a);
        if (op)
            cublasLtMatmulDescDestroy(op);
    }
    cublasStatus_t make(const kfu_lt_gemm &g)
    {
        uint32_t epi = kfu_epilogue(g.kind);
        int32_t ta = g.ta, tb = g.tb;
        cublasStatus_t s = cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F);
        if (s == CUBLAS_STATUS_SUCCESS)
            s = cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta);
        if (s == CUBLAS_STATUS_SUCCESS)
            s = cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb);
        if (s == CUBLAS_STATUS_SUCCESS)
            s = cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi);
        if (s == CUBLAS_STATUS_SUCCESS)
            s = cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.vec, sizeof g.vec);
        if (s == CUBLAS_STATUS_SUCCESS && g.kind == KFU_LT_GELU_AUX_BIAS) {
            int64_t ld = g.m;
            s = cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &g.aux,
                                               sizeof g.aux);
            if (s == CUBLAS_STATUS_SUCCESS)
                s = cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &ld, sizeof ld);
        }
        /* stored shapes: op(A) is m x k, op(B) is k x n */
        bool at = g.ta != CUBLAS_OP_N, bt = g.tb != CUBLAS_OP_N;
        if (s == CUBLAS_STATUS_SUCCESS)
            s = cublasLtMatrixLayoutCreate(&a, g.type, (uint64_t)(at ? g.k : g.m), (uint64_t)(at ? g.m : g.k),
                                           g.lda);
        if (s == CUBLAS_STATUS_SUCCESS)
            s = cublasLtMatrixLayoutCreate(&b, g.type, (uint64_t)(bt ? g.n : g.k), (uint64_t)(bt ? g.k : g.n),
                                           g.ldb);
        if (s == CUBLAS_STATUS_SUCCESS)
            s = cublasLtMatrixLayoutCreate(&d, g.type, (uint64_t)g.m, (uint64_t)g.n, g.ldd);
        return s;
    }
};

/* The cached choice for g (the heuristic is asked once per shape, type,
 * epilogue and alignment; only then are descriptors built for it); NULL
 * when a call failed (recorded). */
static const kcuda_lt_plan *kfu_lt_plan(const moek_ctx *ctx, const kfu_lt_gemm &g)
{
    kcuda_handles *h = kc_handles(ctx);
    uint32_t al[3] = {kfu_align(g.a), kfu_align(g.b), kfu_align(g.d)};
    uint64_t key[4] = {(uint64_t)g.kind | (uint64_t)g.type << 4 | (uint64_t)g.ta << 12 | (uint64_t)g.tb << 14 |
                           (uint64_t)__builtin_ctz(al[0]) << 16 | (uint64_t)__builtin_ctz(al[1]) << 20 |
                           (uint64_t)__builtin_ctz(al[2]) << 24 | (uint64_t)__builtin_ctz(kfu_align(g.vec)) << 28 |
                           (uint64_t)__builtin_ctz(kfu_align(g.aux)) << 32 | (uint64_t)1 << 63,
                       (uint64_t)g.m | (uint64_t)g.n << 32, (uint64_t)g.k | (uint64_t)g.lda << 32,
                       (uint64_t)g.ldb | (uint64_t)g.ldd << 32};
    for (int i = 0; i < KCUDA_LT_PLANS; i++)
        if (!memcmp(h->lt_plans[i].key, key, sizeof key))
            return &h->lt_plans[i];
    kfu_lt_desc dsc;
    cublasStatus_t s = dsc.make(g);
    if (s != CUBLAS_STATUS_SUCCESS) {
        kc_fail(ctx, MOEK_E_DEVICE);
        return nullptr;
    }
    kcuda_lt_plan *p = &h->lt_plans[h->lt_next];
    h->lt_next = (h->lt_next + 1) % KCUDA_LT_PLANS;
    memset(p, 0, sizeof *p);
    cublasLtMatmulPreference_t pref = nullptr;
    s = cublasLtMatmulPreferenceCreate(&pref);
    uint64_t ws = h->blas_ws_bytes;
    static const cublasLtMatmulPreferenceAttributes_t align_attr[4] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
    for (int i = 0; i < 4 && s == CUBLAS_STATUS_SUCCESS; i++) {
        uint32_t v = al[i < 2 ? i : 2];   /* C is D */
        s = cublasLtMatmulPreferenceSetAttribute(pref, align_attr[i], &v, sizeof v);
    }
    cublasLtMatmulHeuristicResult_t r;
    memset(&r, 0, sizeof r);
    int found = 0;
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulAlgoGetHeuristic(h->lt, dsc.op, dsc.a, dsc.b, dsc.d, dsc.d, pref, 1, &r, &found);
    if (pref)
        cublasLtMatmulPreferenceDestroy(pref);
    /* NOT_SUPPORTED (no algorithm for this case) is an answer too */
    if (s != CUBLAS_STATUS_SUCCESS && s != CUBLAS_STATUS_NOT_SUPPORTED) {
        kc_fail(ctx, MOEK_E_DEVICE);
        return nullptr;
    }
    memcpy(p->key, key, sizeof key);
    p->usable = s == CUBLAS_STATUS_SUCCESS && found > 0 && r.state == CUBLAS_STATUS_SUCCESS &&
                r.workspaceSize <= h->blas_ws_bytes;
    if (p->usable)
        p->algo = r.algo;
    return p;
}

/* 1 ran (or, dry, would run), 0 not available here (run the separate
 * kernels), -1 failed (recorded in *ctx->status) */
static int kfu_lt_run(const moek_ctx *ctx, const kfu_lt_gemm &g, bool dry)
{
    kcuda_handles *h = kc_handles(ctx);
    if (!h || !h->lt || g.m <= 0 || g.n <= 0 || g.k <= 0)
        return 0;
    if (g.kind == KFU_LT_GELU_AUX_BIAS && g.m % 8 != 0)
        return 0;
    const kcuda_lt_plan *p = kfu_lt_plan(ctx, g);
    if (!p)
        return -1;
    if (!p->usable)
        return 0;
    if (dry)
        return 1;
    kfu_lt_desc dsc;   /* the pointers it holds (bias, aux) are this call's */
    if (dsc.make(g) != CUBLAS_STATUS_SUCCESS) {
        kc_fail(ctx, MOEK_E_DEVICE);
        return -1;
    }
    const float one = 1.0f, zero = 0.0f;
    return kc_blas_ok(ctx, cublasLtMatmul(h->lt, dsc.op, &one, g.a, dsc.a, g.b, dsc.b, &zero, g.d, dsc.d, g.d,
                                          dsc.d, &p->algo, h->blas_ws, h->blas_ws_bytes, kc_stream(ctx)))
               ? 1
               : -1;
}

/* y (and pre) = x W^T + b (then GELU), one GEMM */
template <typename T>
static int kfu_lt_fwd(const moek_ctx *ctx, const T *x, const T *w, const T *b, T *pre, T *y, int64_t N,
                      int64_t K, int64_t M, bool gelu)
{
    kfu_lt_gemm g = {gelu ? KFU_LT_GELU_AUX_BIAS : KFU_LT_BIAS, kc_blas_type<T>::value, CUBLAS_OP_T, CUBLAS_OP_N,
                     M, N, K, K, K, M, w, x, y, (void *)b, pre};
    return kfu_lt_run(ctx, g, false);
}

/* dw = dp^T x and db = the column sums of dp, one GEMM */
template <typename T>
static int kfu_lt_dw_db(const moek_ctx *ctx, const T *dp, const T *x, T *dw, T *db, int64_t N, int64_t K,
                        int64_t M, bool dry)
{
    kfu_lt_gemm g = {KFU_LT_BGRADB, kc_blas_type<T>::value, CUBLAS_OP_N, CUBLAS_OP_T, K, M, N, K, M, K, x, dp,
                     dw, db, nullptr};
    return kfu_lt_run(ctx, g, dry);
}

#define KFU_MBG(SFX, T, KT, CV)                                                                                 \
    extern "C" void moek_matmul_bias_gelu_fwd##SFX(const moek_ctx *ctx, const T *x, const T *w, const T *b,    \
                                                   T *pre, T *y, int64_t N, int64_t K, int64_t M)              \
    {                                                                                                           \
        if (!kc_shape(ctx, N >= 0 && K >= 0 && M >= 0))                                                         \
            return;                                                                                             \
        if (kfu_lt_fwd<KT>(ctx, CV(x), CV(w), CV(b), CV(pre), CV(y), N, K, M, true) != 0)                       \
            return;                                                                                             \
        moek_matmul_fwd##SFX(ctx, x, w, pre, N, K, M);                                                          \
        kfu_bias_gelu_fwd<KT>(ctx, CV(pre), CV(b), CV(y), N, M);                                                \
    }                                                                                                           \
    extern "C" void moek_matmul_bias_gelu_bwd##SFX(const moek_ctx *ctx, const T *dy, const T *x, const T *w,   \
                                                   const T *pre, T *dx, T *dw, T *db, int64_t N, int64_t K,    \
                                                   int64_t M)                                                  \
    {                                                                                                           \
        if (!kc_shape(ctx, N >= 0 && K >= 0 && M >= 0))                                                         \
            return;                                                                                             \
        size_t nm = (size_t)(N * M) * sizeof(T);                                                                \
        if (!kc_shape(ctx, ctx->workspace && (size_t)ctx->workspace_bytes >= nm))                               \
            return;                                                                                             \
        T *dp = (T *)ctx->workspace;                                                                            \
        int lt = dw && db ? kfu_lt_dw_db<KT>(ctx, CV(dp), CV(x), CV(dw), CV(db), N, K, M, true) : 0;            \
        if (lt < 0)                                                                                             \
            return;                                                                                             \
        if (lt) { /* dpre in parallel; dw and db in one GEMM; then dx */                                        \
            k_gelu_dpre<KT><<<kc_blocks(N * M), KCUDA_THREADS, 0, kc_stream(ctx)>>>(CV(dy), CV(pre), CV(dp),    \
                                                                                     N * M);                    \
            if (kc_launched(ctx) && kfu_lt_dw_db<KT>(ctx, CV(dp), CV(x), CV(dw), CV(db), N, K, M, false) > 0)  \
                moek_matmul_bwd##SFX(ctx, dp, x, w, dx, (T *)NULL, N, K, M);                                    \
            return;                                                                                             \
        }                                                                                                       \
        if (kfu_gelu_bgrad<KT>(ctx, CV(dy), CV(pre), CV(dp), CV(db), N, M))                                     \
            moek_matmul_bwd##SFX(ctx, dp, x, w, dx, dw, N, K, M);                                               \
    }                                                                                                           \
    extern "C" void moek_matmul_bias_fwd##SFX(const moek_ctx *ctx, const T *x, const T *w, const T *b, T *y,   \
                                              int64_t N, int64_t K, int64_t M)                                  \
    {                                                                                                           \
        if (!kc_shape(ctx, N >= 0 && K >= 0 && M >= 0))                                                         \
            return;                                                                                             \
        if (kfu_lt_fwd<KT>(ctx, CV(x), CV(w), CV(b), (KT *)NULL, CV(y), N, K, M, false) != 0)                   \
            return;                                                                                             \
        moek_matmul_fwd##SFX(ctx, x, w, y, N, K, M);                                                            \
        kfu_bias_gelu_fwd<KT>(ctx, CV(y), CV(b), (KT *)NULL, N, M);                                             \
    }                                                                                                           \
    extern "C" void moek_matmul_bias_bwd##SFX(const moek_ctx *ctx, const T *dy, const T *x, const T *w, T *dx, \
                                              T *dw, T *db, int64_t N, int64_t K, int64_t M)                    \
    {                                                                                                           \
        if (!kc_shape(ctx, N >= 0 && K >= 0 && M >= 0))                                                         \
            return;                                                                                             \
        int lt = dw && db ? kfu_lt_dw_db<KT>(ctx, CV(dy), CV(x), CV(dw), CV(db), N, K, M, false) : 0;           \
        if (lt < 0)                                                                                             \
            return;                                                                                             \
        if (lt) {                                                                                               \
            moek_matmul_bwd##SFX(ctx, dy, x, w, dx, (T *)NULL, N, K, M);                                        \
            return;                                                                                             \
        }                                                                                                       \
        if (kfu_gelu_bgrad<KT>(ctx, CV(dy), (const KT *)NULL, (KT *)NULL, CV(db), N, M))                        \
            moek_matmul_bwd##SFX(ctx, dy, x, w, dx, dw, N, K, M);                                               \
    }

#define KFU_ID(p) (p)
KFU_MBG(, float, float, KFU_ID)
KFU_MBG(_bf16, moek_bf16, kc_bf16, kc_bf)
KFU_MBG(_f16, moek_f16, kc_f16, kc_hf)
