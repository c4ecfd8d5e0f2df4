/* fused.c - the fused ops of kernels/moek.h (issue 8), CPU reference.
 *
 * Each is written as the composition of the public fp32 kernels it fuses,
 * so it computes exactly what the unfused ops compute (the tests compare
 * bit for bit); the win on CPU is one launch and one pass fewer over the
 * rows, the win on CUDA (fused.cu) one read of a and b fewer.
 *
 * The half variants (bf16, f16) widen into ctx->workspace like bf16.c,
 * and round where the unfused ops round: the sum s before the norm reads
 * it, the norm's dx before ds is added.  They need
 * MOEK_BF16_WORKSPACE_BYTES(sum of their half arguments' element counts),
 * and otherwise set MOEK_E_SHAPE and write nothing. */
#include "kcpu.h"

void moek_add_rmsnorm_fwd(const moek_ctx *ctx, const float *a, const float *b, const float *w, float *s,
                          float *y, float *rstd, int64_t N, int64_t D, float eps)
{
    int64_t n = N * D;
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, n))
    for (int64_t i = 0; i < n; i++)
        s[i] = a[i] + b[i];
    moek_rmsnorm_fwd(ctx, s, w, y, rstd, N, D, eps);
}

void moek_add_rmsnorm_bwd(const moek_ctx *ctx, const float *dy, const float *ds, const float *s,
                          const float *w, const float *rstd, float *da, float *db, float *dw,
                          int64_t N, int64_t D)
{
    int64_t n = N * D;
    moek_rmsnorm_bwd(ctx, dy, s, w, rstd, da, dw, N, D);
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, n))
    for (int64_t i = 0; i < n; i++) {
        da[i] = da[i] + ds[i];
        db[i] = da[i];
    }
}

/* ---- half storage: bf16 and f16 share the code, not the rounding -------- */
typedef struct {
    uint16_t (*round)(float);
    float (*widen)(uint16_t);
} kfu_half;

static const kfu_half kfu_bf16 = {moek_bf16_from_f32, moek_bf16_to_f32};
static const kfu_half kfu_f16 = {moek_f16_from_f32, moek_f16_to_f32};

/* Carves `k` fp32 buffers of len[i] elements from the workspace, 64-byte
 * aligned.  0 (MOEK_E_SHAPE set) when it is too small. */
static int kfu_carve(const moek_ctx *ctx, int k, const int64_t *len, float **f)
{
    int64_t total = 0;
    for (int i = 0; i < k; i++)
        total += len[i] > 0 ? len[i] : 0;
    if (total > 0 && (!ctx || !ctx->workspace || ctx->workspace_bytes < MOEK_BF16_WORKSPACE_BYTES(total))) {
        kcpu_fail(ctx, MOEK_E_SHAPE);
        return 0;
    }
    uintptr_t at = total > 0 ? (uintptr_t)ctx->workspace : 0;
    for (int i = 0; i < k; i++) {
        at = (at + 63) & ~(uintptr_t)63;
        f[i] = (float *)at;
        at += (uintptr_t)(len[i] > 0 ? len[i] : 0) * sizeof(float);
    }
    return 1;
}

static void kfu_widen(const moek_ctx *ctx, const kfu_half *h, const uint16_t *x, float *y, int64_t n)
{
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, n))
    for (int64_t i = 0; i < n; i++)
        y[i] = h->widen(x[i]);
}

static void kfu_round(const moek_ctx *ctx, const kfu_half *h, const float *x, uint16_t *y, int64_t n)
{
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, n))
    for (int64_t i = 0; i < n; i++)
        y[i] = h->round(x[i]);
}

/* a, b, w, s, y: five workspace pieces (the y piece is the norm's output). */
static void kfu_add_rmsnorm_fwd(const moek_ctx *ctx, const kfu_half *h, const uint16_t *a, const uint16_t *b,
                                const uint16_t *w, uint16_t *s, uint16_t *y, float *rstd, int64_t N, int64_t D,
                                float eps)
{
    int64_t n = N * D, len[3] = {n, D, n};
    float *f[3];
    if (!kfu_carve(ctx, 3, len, f))
        return;
    float *sf = f[0], *wf = f[1], *yf = f[2];
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, n))
    for (int64_t i = 0; i < n; i++) {
        uint16_t r = h->round(h->widen(a[i]) + h->widen(b[i]));
        s[i] = r;
        sf[i] = h->widen(r);   /* the norm reads the stored s, as it would unfused */
    }
    kfu_widen(ctx, h, w, wf, D);
    moek_rmsnorm_fwd(ctx, sf, wf, yf, rstd, N, D, eps);
    kfu_round(ctx, h, yf, y, n);
}

static void kfu_add_rmsnorm_bwd(const moek_ctx *ctx, const kfu_half *h, const uint16_t *dy, const uint16_t *ds,
                                const uint16_t *s, const uint16_t *w, const float *rstd, uint16_t *da,
                                uint16_t *db, uint16_t *dw, int64_t N, int64_t D)
{
    int64_t n = N * D, len[5] = {n, n, D, n, D};
    float *f[5];
    if (!kfu_carve(ctx, 5, len, f))
        return;
    float *dyf = f[0], *sf = f[1], *wf = f[2], *dxf = f[3], *dwf = f[4];
    kfu_widen(ctx, h, dy, dyf, n);
    kfu_widen(ctx, h, s, sf, n);
    kfu_widen(ctx, h, w, wf, D);
    moek_rmsnorm_bwd(ctx, dyf, sf, wf, rstd, dxf, dwf, N, D);
    kfu_round(ctx, h, dwf, dw, D);
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, n))
    for (int64_t i = 0; i < n; i++) {
        float dx = h->widen(h->round(dxf[i]));   /* the norm's stored dx, then the gradient sum */
        uint16_t r = h->round(dx + h->widen(ds[i]));
        da[i] = r;
        db[i] = r;
    }
}

void moek_add_rmsnorm_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *a, const moek_bf16 *b,
                               const moek_bf16 *w, moek_bf16 *s, moek_bf16 *y, float *rstd,
                               int64_t N, int64_t D, float eps)
{
    kfu_add_rmsnorm_fwd(ctx, &kfu_bf16, a, b, w, s, y, rstd, N, D, eps);
}

void moek_add_rmsnorm_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, const moek_bf16 *ds,
                               const moek_bf16 *s, const moek_bf16 *w, const float *rstd, moek_bf16 *da,
                               moek_bf16 *db, moek_bf16 *dw, int64_t N, int64_t D)
{
    kfu_add_rmsnorm_bwd(ctx, &kfu_bf16, dy, ds, s, w, rstd, da, db, dw, N, D);
}

void moek_add_rmsnorm_fwd_f16(const moek_ctx *ctx, const moek_f16 *a, const moek_f16 *b,
                              const moek_f16 *w, moek_f16 *s, moek_f16 *y, float *rstd,
                              int64_t N, int64_t D, float eps)
{
    kfu_add_rmsnorm_fwd(ctx, &kfu_f16, a, b, w, s, y, rstd, N, D, eps);
}

void moek_add_rmsnorm_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, const moek_f16 *ds,
                              const moek_f16 *s, const moek_f16 *w, const float *rstd, moek_f16 *da,
                              moek_f16 *db, moek_f16 *dw, int64_t N, int64_t D)
{
    kfu_add_rmsnorm_bwd(ctx, &kfu_f16, dy, ds, s, w, rstd, da, db, dw, N, D);
}

/* ---- SwiGLU with its projections ----------------------------------------- */
void moek_swiglu_proj_fwd(const moek_ctx *ctx, const float *x, const float *w1, const float *w3, float *gate,
                          float *up, float *y, int64_t N, int64_t K, int64_t M)
{
    moek_matmul_fwd(ctx, x, w1, gate, N, K, M);
    moek_matmul_fwd(ctx, x, w3, up, N, K, M);
    moek_swiglu_fwd(ctx, gate, up, y, N * M);
}

void moek_swiglu_proj_bwd(const moek_ctx *ctx, const float *dy, const float *x, const float *w1,
                          const float *w3, const float *gate, const float *up, float *dx, float *dw1,
                          float *dw3, int64_t N, int64_t K, int64_t M)
{
    int64_t len[3] = {N * M, N * M, N * K};
    float *f[3];
    if (!kfu_carve(ctx, 3, len, f))
        return;
    float *dg = f[0], *du = f[1], *dx1 = f[2];
    moek_swiglu_bwd(ctx, dy, gate, up, dg, du, N * M);
    moek_matmul_bwd(ctx, dg, x, w1, dx1, dw1, N, K, M);
    moek_matmul_bwd(ctx, du, x, w3, dx, dw3, N, K, M);
    int64_t n = N * K;
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, n))
    for (int64_t i = 0; i < n; i++)
        dx[i] = dx1[i] + dx[i];   /* the unfused gradient sum; a + b == b + a in IEEE */
}

/* Widens h[0..n) into f and rounds it back: the fp32 view of a half value
 * the unfused op would have stored. */
static void kfu_store(const moek_ctx *ctx, const kfu_half *h, float *f, uint16_t *out, int64_t n)
{
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, n))
    for (int64_t i = 0; i < n; i++) {
        uint16_t r = h->round(f[i]);
        if (out)
            out[i] = r;
        f[i] = h->widen(r);
    }
}

/* x, w1, w3, gate, up, y: six pieces, the half arguments' element count. */
static void kfu_swiglu_proj_fwd(const moek_ctx *ctx, const kfu_half *h, const uint16_t *x, const uint16_t *w1,
                                const uint16_t *w3, uint16_t *gate, uint16_t *up, uint16_t *y, int64_t N,
                                int64_t K, int64_t M)
{
    int64_t len[6] = {N * K, M * K, M * K, N * M, N * M, N * M};
    float *f[6];
    if (!kfu_carve(ctx, 6, len, f))
        return;
    kfu_widen(ctx, h, x, f[0], N * K);
    kfu_widen(ctx, h, w1, f[1], M * K);
    kfu_widen(ctx, h, w3, f[2], M * K);
    moek_matmul_fwd(ctx, f[0], f[1], f[3], N, K, M);
    kfu_store(ctx, h, f[3], gate, N * M);
    moek_matmul_fwd(ctx, f[0], f[2], f[4], N, K, M);
    kfu_store(ctx, h, f[4], up, N * M);
    moek_swiglu_fwd(ctx, f[3], f[4], f[5], N * M);
    kfu_round(ctx, h, f[5], y, N * M);
}

/* dgate, dup, x, w1, w3, dx, dw: 2NM + 2NK + 3MK of the 3NM + 2NK + 4MK
 * half elements the arguments hold.  dy, gate and up widen on the stack. */
static void kfu_swiglu_proj_bwd(const moek_ctx *ctx, const kfu_half *h, const uint16_t *dy, const uint16_t *x,
                                const uint16_t *w1, const uint16_t *w3, const uint16_t *gate,
                                const uint16_t *up, uint16_t *dx, uint16_t *dw1, uint16_t *dw3, int64_t N,
                                int64_t K, int64_t M)
{
    int64_t len[7] = {N * M, N * M, N * K, M * K, M * K, N * K, M * K};
    float *f[7];
    if (!kfu_carve(ctx, 7, len, f))
        return;
    float *dg = f[0], *du = f[1], *xf = f[2], *w1f = f[3], *w3f = f[4], *dxf = f[5], *dwf = f[6];
    enum { CH = 256 };
    int64_t nm = N * M, chunks = (nm + CH - 1) / CH;
    moek_ctx one = ctx ? *ctx : (moek_ctx){0};
    one.num_threads = 1;
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, 8 * nm))
    for (int64_t c = 0; c < chunks; c++) {
        float d[CH], g[CH], u[CH];
        int64_t o = c * CH, m = nm - o < CH ? nm - o : CH;
        for (int64_t i = 0; i < m; i++) {
            d[i] = h->widen(dy[o + i]);
            g[i] = h->widen(gate[o + i]);
            u[i] = h->widen(up[o + i]);
        }
        moek_swiglu_bwd(&one, d, g, u, dg + o, du + o, m);
        for (int64_t i = 0; i < m; i++) {   /* the stored dgate and dup */
            dg[o + i] = h->widen(h->round(dg[o + i]));
            du[o + i] = h->widen(h->round(du[o + i]));
        }
    }
    kfu_widen(ctx, h, x, xf, N * K);
    kfu_widen(ctx, h, w1, w1f, M * K);
    kfu_widen(ctx, h, w3, w3f, M * K);
    moek_matmul_bwd(ctx, dg, xf, w1f, dxf, dwf, N, K, M);
    kfu_round(ctx, h, dwf, dw1, M * K);
    kfu_round(ctx, h, dxf, dx, N * K);
    moek_matmul_bwd(ctx, du, xf, w3f, dxf, dwf, N, K, M);
    kfu_round(ctx, h, dwf, dw3, M * K);
    int64_t n = N * K;
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, n))
    for (int64_t i = 0; i < n; i++)   /* the stored dx3, then the gradient sum */
        dx[i] = h->round(h->widen(dx[i]) + h->widen(h->round(dxf[i])));
}

void moek_swiglu_proj_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *x, const moek_bf16 *w1,
                               const moek_bf16 *w3, moek_bf16 *gate, moek_bf16 *up, moek_bf16 *y,
                               int64_t N, int64_t K, int64_t M)
{
    kfu_swiglu_proj_fwd(ctx, &kfu_bf16, x, w1, w3, gate, up, y, N, K, M);
}

void moek_swiglu_proj_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, const moek_bf16 *x,
                               const moek_bf16 *w1, const moek_bf16 *w3, const moek_bf16 *gate,
                               const moek_bf16 *up, moek_bf16 *dx, moek_bf16 *dw1, moek_bf16 *dw3,
                               int64_t N, int64_t K, int64_t M)
{
    kfu_swiglu_proj_bwd(ctx, &kfu_bf16, dy, x, w1, w3, gate, up, dx, dw1, dw3, N, K, M);
}

void moek_swiglu_proj_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, const moek_f16 *w1,
                              const moek_f16 *w3, moek_f16 *gate, moek_f16 *up, moek_f16 *y,
                              int64_t N, int64_t K, int64_t M)
{
    kfu_swiglu_proj_fwd(ctx, &kfu_f16, x, w1, w3, gate, up, y, N, K, M);
}

void moek_swiglu_proj_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, const moek_f16 *x,
                              const moek_f16 *w1, const moek_f16 *w3, const moek_f16 *gate,
                              const moek_f16 *up, moek_f16 *dx, moek_f16 *dw1, moek_f16 *dw3,
                              int64_t N, int64_t K, int64_t M)
{
    kfu_swiglu_proj_bwd(ctx, &kfu_f16, dy, x, w1, w3, gate, up, dx, dw1, dw3, N, K, M);
}

/* ---- router softmax + top-k ---------------------------------------------- */
void moek_softmax_topk_fwd(const moek_ctx *ctx, const float *logits, float *probs, int32_t *idx, float *gates,
                           int64_t N, int64_t E, int64_t k, int64_t renorm)
{
    moek_softmax_fwd(ctx, logits, probs, N, E);
    moek_topk_fwd(ctx, probs, idx, gates, N, E, k, renorm);
}

/* dlogits holds the summed dprobs first: softmax_bwd reads a row's dp
 * (for the dot) before it writes that row, and element i before i. */
void moek_softmax_topk_bwd(const moek_ctx *ctx, const float *dprobs, const float *dgates, const float *probs,
                           const int32_t *idx, float *dlogits, int64_t N, int64_t E, int64_t k, int64_t renorm)
{
    moek_topk_bwd(ctx, dgates, probs, idx, dlogits, N, E, k, renorm);
    int64_t n = N * E;
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, n))
    for (int64_t i = 0; i < n; i++)
        dlogits[i] = dlogits[i] + dprobs[i];
    moek_softmax_bwd(ctx, dlogits, probs, dlogits, N, E);
}

static void kfu_softmax_topk_fwd(const moek_ctx *ctx, const kfu_half *h, const uint16_t *logits, float *probs,
                                 int32_t *idx, float *gates, int64_t N, int64_t E, int64_t k, int64_t renorm)
{
    int64_t len[1] = {N * E};
    float *f[1];
    if (!kfu_carve(ctx, 1, len, f))
        return;
    kfu_widen(ctx, h, logits, f[0], N * E);
    moek_softmax_topk_fwd(ctx, f[0], probs, idx, gates, N, E, k, renorm);
}

static void kfu_softmax_topk_bwd(const moek_ctx *ctx, const kfu_half *h, const float *dprobs, const float *dgates,
                                 const float *probs, const int32_t *idx, uint16_t *dlogits, int64_t N, int64_t E,
                                 int64_t k, int64_t renorm)
{
    int64_t len[1] = {N * E};
    float *f[1];
    if (!kfu_carve(ctx, 1, len, f))
        return;
    moek_softmax_topk_bwd(ctx, dprobs, dgates, probs, idx, f[0], N, E, k, renorm);
    kfu_round(ctx, h, f[0], dlogits, N * E);
}

void moek_softmax_topk_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *logits, float *probs, int32_t *idx,
                                float *gates, int64_t N, int64_t E, int64_t k, int64_t renorm)
{
    kfu_softmax_topk_fwd(ctx, &kfu_bf16, logits, probs, idx, gates, N, E, k, renorm);
}

void moek_softmax_topk_bwd_bf16(const moek_ctx *ctx, const float *dprobs, const float *dgates,
                                const float *probs, const int32_t *idx, moek_bf16 *dlogits, int64_t N,
                                int64_t E, int64_t k, int64_t renorm)
{
    kfu_softmax_topk_bwd(ctx, &kfu_bf16, dprobs, dgates, probs, idx, dlogits, N, E, k, renorm);
}

void moek_softmax_topk_fwd_f16(const moek_ctx *ctx, const moek_f16 *logits, float *probs, int32_t *idx,
                               float *gates, int64_t N, int64_t E, int64_t k, int64_t renorm)
{
    kfu_softmax_topk_fwd(ctx, &kfu_f16, logits, probs, idx, gates, N, E, k, renorm);
}

void moek_softmax_topk_bwd_f16(const moek_ctx *ctx, const float *dprobs, const float *dgates,
                               const float *probs, const int32_t *idx, moek_f16 *dlogits, int64_t N,
                               int64_t E, int64_t k, int64_t renorm)
{
    kfu_softmax_topk_bwd(ctx, &kfu_f16, dprobs, dgates, probs, idx, dlogits, N, E, k, renorm);
}

/* ---- a linear layer with its bias (and GELU) ------------------------------
 * The GEMM writes pre, the bias is added in place (bias_add reads element i
 * before it writes it), GELU reads pre.  The backward's dpre is scratch. */
void moek_matmul_bias_gelu_fwd(const moek_ctx *ctx, const float *x, const float *w, const float *b, float *pre,
                               float *y, int64_t N, int64_t K, int64_t M)
{
    moek_matmul_fwd(ctx, x, w, pre, N, K, M);
    moek_bias_add_fwd(ctx, pre, b, pre, N, M);
    moek_gelu_fwd(ctx, pre, y, N * M);
}

void moek_matmul_bias_gelu_bwd(const moek_ctx *ctx, const float *dy, const float *x, const float *w,
                               const float *pre, float *dx, float *dw, float *db, int64_t N, int64_t K, int64_t M)
{
    int64_t len[1] = {N * M};
    float *f[1];
    if (!kfu_carve(ctx, 1, len, f))
        return;
    moek_gelu_bwd(ctx, dy, pre, f[0], N * M);
    moek_bias_add_bwd(ctx, f[0], NULL, db, N, M);   /* bias_add's dx is dpre itself */
    moek_matmul_bwd(ctx, f[0], x, w, dx, dw, N, K, M);
}

void moek_matmul_bias_fwd(const moek_ctx *ctx, const float *x, const float *w, const float *b, float *y,
                          int64_t N, int64_t K, int64_t M)
{
    moek_matmul_fwd(ctx, x, w, y, N, K, M);
    moek_bias_add_fwd(ctx, y, b, y, N, M);
}

void moek_matmul_bias_bwd(const moek_ctx *ctx, const float *dy, const float *x, const float *w, float *dx,
                          float *dw, float *db, int64_t N, int64_t K, int64_t M)
{
    moek_bias_add_bwd(ctx, dy, NULL, db, N, M);
    moek_matmul_bwd(ctx, dy, x, w, dx, dw, N, K, M);
}

/* f = the fp32 view of pre = round(round(x W^T) + b), stored to pre: the
 * GEMM's stored output, then bias_add's */
static void kfu_gemm_bias(const moek_ctx *ctx, const kfu_half *h, const float *xf, const float *wf, const float *bf,
                          float *f, uint16_t *pre, int64_t N, int64_t K, int64_t M)
{
    moek_matmul_fwd(ctx, xf, wf, f, N, K, M);
    kfu_store(ctx, h, f, NULL, N * M);
    moek_bias_add_fwd(ctx, f, bf, f, N, M);
    kfu_store(ctx, h, f, pre, N * M);
}

/* x, w, b, pre, y: the half arguments' element count */
static void kfu_mbg_fwd(const moek_ctx *ctx, const kfu_half *h, const uint16_t *x, const uint16_t *w,
                        const uint16_t *b, uint16_t *pre, uint16_t *y, int64_t N, int64_t K, int64_t M)
{
    int64_t len[5] = {N * K, M * K, M, N * M, y ? N * M : 0};
    float *f[5];
    if (!kfu_carve(ctx, 5, len, f))
        return;
    kfu_widen(ctx, h, x, f[0], N * K);
    kfu_widen(ctx, h, w, f[1], M * K);
    kfu_widen(ctx, h, b, f[2], M);
    kfu_gemm_bias(ctx, h, f[0], f[1], f[2], f[3], pre, N, K, M);
    if (!y)
        return;   /* matmul_bias: pre is the output */
    moek_gelu_fwd(ctx, f[3], f[4], N * M);
    kfu_round(ctx, h, f[4], y, N * M);
}

/* dpre (the stored GELU gradient, or dy without GELU), x, w, dx, dw, db:
 * within the half arguments' element count */
static void kfu_mbg_bwd(const moek_ctx *ctx, const kfu_half *h, const uint16_t *dy, const uint16_t *x,
                        const uint16_t *w, const uint16_t *pre, uint16_t *dx, uint16_t *dw, uint16_t *db, int64_t N,
                        int64_t K, int64_t M)
{
    int64_t nm = N * M, len[6] = {nm, N * K, M * K, N * K, M * K, M};
    float *f[6];
    if (!kfu_carve(ctx, 6, len, f))
        return;
    float *dp = f[0], *xf = f[1], *wf = f[2], *dxf = f[3], *dwf = f[4], *dbf = f[5];
    if (pre) {
        enum { CH = 256 };
        int64_t chunks = nm > 0 ? (nm + CH - 1) / CH : 0;
        moek_ctx one = ctx ? *ctx : (moek_ctx){0};
        one.num_threads = 1;
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, 8 * nm))
        for (int64_t c = 0; c < chunks; c++) {
            float d[CH], p[CH];
            int64_t o = c * CH, m = nm - o < CH ? nm - o : CH;
            for (int64_t i = 0; i < m; i++) {
                d[i] = h->widen(dy[o + i]);
                p[i] = h->widen(pre[o + i]);
            }
            moek_gelu_bwd(&one, d, p, dp + o, m);
            for (int64_t i = 0; i < m; i++)   /* the stored dpre */
                dp[o + i] = h->widen(h->round(dp[o + i]));
        }
    } else {
        kfu_widen(ctx, h, dy, dp, nm);
    }
    moek_bias_add_bwd(ctx, dp, NULL, dbf, N, M);
    kfu_round(ctx, h, dbf, db, M);
    kfu_widen(ctx, h, x, xf, N * K);
    kfu_widen(ctx, h, w, wf, M * K);
    moek_matmul_bwd(ctx, dp, xf, wf, dxf, dwf, N, K, M);
    kfu_round(ctx, h, dxf, dx, N * K);
    kfu_round(ctx, h, dwf, dw, M * K);
}

void moek_matmul_bias_gelu_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *x, const moek_bf16 *w,
                                    const moek_bf16 *b, moek_bf16 *pre, moek_bf16 *y, int64_t N, int64_t K,
                                    int64_t M)
{
    kfu_mbg_fwd(ctx, &kfu_bf16, x, w, b, pre, y, N, K, M);
}

void moek_matmul_bias_gelu_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, const moek_bf16 *x,
                                    const moek_bf16 *w, const moek_bf16 *pre, moek_bf16 *dx, moek_bf16 *dw,
                                    moek_bf16 *db, int64_t N, int64_t K, int64_t M)
{
    kfu_mbg_bwd(ctx, &kfu_bf16, dy, x, w, pre, dx, dw, db, N, K, M);
}

void moek_matmul_bias_gelu_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, const moek_f16 *w,
                                   const moek_f16 *b, moek_f16 *pre, moek_f16 *y, int64_t N, int64_t K,
                                   int64_t M)
{
    kfu_mbg_fwd(ctx, &kfu_f16, x, w, b, pre, y, N, K, M);
}

void moek_matmul_bias_gelu_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, const moek_f16 *x,
                                   const moek_f16 *w, const moek_f16 *pre, moek_f16 *dx, moek_f16 *dw,
                                   moek_f16 *db, int64_t N, int64_t K, int64_t M)
{
    kfu_mbg_bwd(ctx, &kfu_f16, dy, x, w, pre, dx, dw, db, N, K, M);
}

void moek_matmul_bias_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *x, const moek_bf16 *w, const moek_bf16 *b,
                               moek_bf16 *y, int64_t N, int64_t K, int64_t M)
{
    kfu_mbg_fwd(ctx, &kfu_bf16, x, w, b, y, NULL, N, K, M);
}

void moek_matmul_bias_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, const moek_bf16 *x,
                               const moek_bf16 *w, moek_bf16 *dx, moek_bf16 *dw, moek_bf16 *db, int64_t N,
                               int64_t K, int64_t M)
{
    kfu_mbg_bwd(ctx, &kfu_bf16, dy, x, w, NULL, dx, dw, db, N, K, M);
}

void moek_matmul_bias_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, const moek_f16 *w, const moek_f16 *b,
                              moek_f16 *y, int64_t N, int64_t K, int64_t M)
{
    kfu_mbg_fwd(ctx, &kfu_f16, x, w, b, y, NULL, N, K, M);
}

void moek_matmul_bias_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, const moek_f16 *x, const moek_f16 *w,
                              moek_f16 *dx, moek_f16 *dw, moek_f16 *db, int64_t N, int64_t K, int64_t M)
{
    kfu_mbg_bwd(ctx, &kfu_f16, dy, x, w, NULL, dx, dw, db, N, K, M);
}
