/* fused.cu - the fused ops of kernels/moek.h (issue 8).  Twin of
 * kernels/cpu/fused.c: the same maths in the same rounding steps, with the
 * norm statistics in double as in norm.cu.  Residual add + RMSNorm reads a
 * and b once and writes s and y in one kernel (unfused: add writes s, the
 * norm reads it back twice); its backward adds the residual gradient ds in
 * the same pass that writes the norm's dx. */
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

#define KFU_MBG(SFX, T, KT, CV)                                                                                 \
    extern "C" void moek_matmul_bias_gelu_fwd##SFX(const moek_ctx *ctx, const T *x, const T *w, const T *b,    \
                                                   T *pre, T *y, int64_t N, int64_t K, int64_t M)              \
    {                                                                                                           \
        if (!kc_shape(ctx, N >= 0 && K >= 0 && M >= 0))                                                         \
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
        if (kfu_gelu_bgrad<KT>(ctx, CV(dy), CV(pre), CV(dp), CV(db), N, M))                                     \
            moek_matmul_bwd##SFX(ctx, dp, x, w, dx, dw, N, K, M);                                               \
    }                                                                                                           \
    extern "C" void moek_matmul_bias_fwd##SFX(const moek_ctx *ctx, const T *x, const T *w, const T *b, T *y,   \
                                              int64_t N, int64_t K, int64_t M)                                  \
    {                                                                                                           \
        if (!kc_shape(ctx, N >= 0 && K >= 0 && M >= 0))                                                         \
            return;                                                                                             \
        moek_matmul_fwd##SFX(ctx, x, w, y, N, K, M);                                                            \
        kfu_bias_gelu_fwd<KT>(ctx, CV(y), CV(b), (KT *)NULL, N, M);                                             \
    }                                                                                                           \
    extern "C" void moek_matmul_bias_bwd##SFX(const moek_ctx *ctx, const T *dy, const T *x, const T *w, T *dx, \
                                              T *dw, T *db, int64_t N, int64_t K, int64_t M)                    \
    {                                                                                                           \
        if (!kc_shape(ctx, N >= 0 && K >= 0 && M >= 0))                                                         \
            return;                                                                                             \
        if (kfu_gelu_bgrad<KT>(ctx, CV(dy), (const KT *)NULL, (KT *)NULL, CV(db), N, M))                        \
            moek_matmul_bwd##SFX(ctx, dy, x, w, dx, dw, N, K, M);                                               \
    }

#define KFU_ID(p) (p)
KFU_MBG(, float, float, KFU_ID)
KFU_MBG(_bf16, moek_bf16, kc_bf16, kc_bf)
KFU_MBG(_f16, moek_f16, kc_f16, kc_hf)
