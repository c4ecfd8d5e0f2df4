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
#include "bf16.h"
#include "f16.h"
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

static uint16_t kfu_round_bf16(float f) { return kbf16_round(f); }
static float kfu_widen_bf16(uint16_t h) { return kbf16_widen(h); }
static uint16_t kfu_round_f16(float f) { return kf16_round(f); }
static float kfu_widen_f16(uint16_t h) { return kf16_widen(h); }
static const kfu_half kfu_bf16 = {kfu_round_bf16, kfu_widen_bf16};
static const kfu_half kfu_f16 = {kfu_round_f16, kfu_widen_f16};

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
