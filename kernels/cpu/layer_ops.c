/* layer_ops.c - LayerNorm with bias, SiLU, the grouped-query head expansion
 * (repeat_kv) and a row bias (bias_add), with their bf16 variants.  Twin of
 * kernels/cuda/layer_ops.cu.  Statistics and column sums are in double, as
 * in norm.c; each column sum has one owner thread, so results do not depend
 * on the thread count. */
#include <math.h>

#include "kcpu.h"

/* ---- layernorm ------------------------------------------------------------ */
void moek_layernorm_fwd(const moek_ctx *ctx, const float *x, const float *w, const float *b, float *y,
                        float *mean, float *rstd, int64_t N, int64_t D, float eps)
{
    if (N < 0 || D < 0) {
        kcpu_fail(ctx, MOEK_E_SHAPE);
        return;
    }
    double inv_d = 1.0 / (double)(D > 0 ? D : 1);
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, N * D))
    for (int64_t n = 0; n < N; n++) {
        const float *xr = x + n * D;
        float *yr = y + n * D;
        /* two passes: the variance of a row far from zero keeps its digits */
        double s = 0.0, ss = 0.0;
        for (int64_t d = 0; d < D; d++)
            s += xr[d];
        double mu = s * inv_d;
        for (int64_t d = 0; d < D; d++)
            ss += ((double)xr[d] - mu) * ((double)xr[d] - mu);
        float m = (float)mu, r = (float)(1.0 / sqrt(ss * inv_d + (double)eps));
        mean[n] = m;
        rstd[n] = r;
        for (int64_t d = 0; d < D; d++)
            yr[d] = (xr[d] - m) * r * w[d] + b[d];
    }
}

/* Column sums over N rows of f(n, d), chunks of columns per thread. */
#define KL_COLS 64

void moek_layernorm_bwd(const moek_ctx *ctx, const float *dy, const float *x, const float *w,
                        const float *mean, const float *rstd, float *dx, float *dw, float *db,
                        int64_t N, int64_t D)
{
    if (N < 0 || D < 0) {
        kcpu_fail(ctx, MOEK_E_SHAPE);
        return;
    }
    int team = kcpu_team(ctx, N * D);
    double inv_d = 1.0 / (double)(D > 0 ? D : 1);
    if (dx) {
#pragma omp parallel for schedule(static) num_threads(team)
        for (int64_t n = 0; n < N; n++) {
            const float *xr = x + n * D, *dyr = dy + n * D;
            float *dxr = dx + n * D;
            double m = mean[n], r = rstd[n], sg = 0.0, sgx = 0.0;
            for (int64_t d = 0; d < D; d++) {
                double g = (double)dyr[d] * w[d];
                sg += g;
                sgx += g * ((double)xr[d] - m) * r;
            }
            sg *= inv_d;
            sgx *= inv_d;
            for (int64_t d = 0; d < D; d++) {
                double xh = ((double)xr[d] - m) * r;
                dxr[d] = (float)(r * ((double)dyr[d] * w[d] - sg - xh * sgx));
            }
        }
    }
    if (dw || db) {
        int64_t nchunks = (D + KL_COLS - 1) / KL_COLS;
#pragma omp parallel for schedule(static) num_threads(team)
        for (int64_t c = 0; c < nchunks; c++) {
            int64_t d0 = c * KL_COLS, d1 = d0 + KL_COLS < D ? d0 + KL_COLS : D;
            double aw[KL_COLS] = {0}, ab[KL_COLS] = {0};
            for (int64_t n = 0; n < N; n++) {
                const float *xr = x + n * D, *dyr = dy + n * D;
                double m = mean[n], r = rstd[n];
                for (int64_t d = d0; d < d1; d++) {
                    aw[d - d0] += (double)dyr[d] * ((double)xr[d] - m) * r;
                    ab[d - d0] += dyr[d];
                }
            }
            for (int64_t d = d0; d < d1; d++) {
                if (dw)
                    dw[d] = (float)aw[d - d0];
                if (db)
                    db[d] = (float)ab[d - d0];
            }
        }
    }
}

/* ---- silu ----------------------------------------------------------------- */
void moek_silu_fwd(const moek_ctx *ctx, const float *x, float *y, int64_t n)
{
#pragma omp parallel for simd schedule(static) num_threads(kcpu_team(ctx, 8 * n))
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        y[i] = v / (1.0f + kcpu_expf(-v));
    }
}

void moek_silu_bwd(const moek_ctx *ctx, const float *dy, const float *x, float *dx, int64_t n)
{
#pragma omp parallel for simd schedule(static) num_threads(kcpu_team(ctx, 8 * n))
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        float s = 1.0f / (1.0f + kcpu_expf(-v));
        dx[i] = dy[i] * s * (1.0f + v * (1.0f - s));
    }
}

/* ---- repeat_kv ------------------------------------------------------------ */
static int kl_kv_ok(const moek_ctx *ctx, int64_t N, int64_t Hkv, int64_t H, int64_t Dh)
{
    if (N < 0 || Hkv <= 0 || H < 0 || Dh < 0 || H % Hkv != 0) {
        kcpu_fail(ctx, MOEK_E_SHAPE);
        return 0;
    }
    return 1;
}

void moek_repeat_kv_fwd(const moek_ctx *ctx, const float *x, float *y, int64_t N, int64_t Hkv,
                        int64_t H, int64_t Dh)
{
    if (!kl_kv_ok(ctx, N, Hkv, H, Dh))
        return;
    int64_t rep = H / Hkv;
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, N * H * Dh))
    for (int64_t n = 0; n < N; n++)
        for (int64_t h = 0; h < H; h++)
            memcpy(y + (n * H + h) * Dh, x + (n * Hkv + h / rep) * Dh, (size_t)Dh * sizeof *y);
}

/* fp32 sums in head order (the CUDA twin uses the same order) */
void moek_repeat_kv_bwd(const moek_ctx *ctx, const float *dy, float *dx, int64_t N, int64_t Hkv,
                        int64_t H, int64_t Dh)
{
    if (!kl_kv_ok(ctx, N, Hkv, H, Dh))
        return;
    int64_t rep = H / Hkv;
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, N * H * Dh))
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < Hkv; k++)
            for (int64_t d = 0; d < Dh; d++) {
                float s = 0.0f;
                for (int64_t g = 0; g < rep; g++)
                    s += dy[(n * H + k * rep + g) * Dh + d];
                dx[(n * Hkv + k) * Dh + d] = s;
            }
}

/* ---- bias_add --------------------------------------------------------------- */
void moek_bias_add_fwd(const moek_ctx *ctx, const float *x, const float *b, float *y, int64_t N,
                       int64_t D)
{
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, N * D))
    for (int64_t n = 0; n < N; n++)
        for (int64_t d = 0; d < D; d++)
            y[n * D + d] = x[n * D + d] + b[d];
}

void moek_bias_add_bwd(const moek_ctx *ctx, const float *dy, float *dx, float *db, int64_t N,
                       int64_t D)
{
    if (N < 0 || D < 0) {
        kcpu_fail(ctx, MOEK_E_SHAPE);
        return;
    }
    if (dx && dx != dy && N * D > 0)
        memcpy(dx, dy, (size_t)(N * D) * sizeof *dx);
    if (!db)
        return;
    int64_t nchunks = (D + KL_COLS - 1) / KL_COLS;
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, N * D))
    for (int64_t c = 0; c < nchunks; c++) {
        int64_t d0 = c * KL_COLS, d1 = d0 + KL_COLS < D ? d0 + KL_COLS : D;
        double acc[KL_COLS] = {0};
        for (int64_t n = 0; n < N; n++)
            for (int64_t d = d0; d < d1; d++)
                acc[d - d0] += dy[n * D + d];
        for (int64_t d = d0; d < d1; d++)
            db[d] = (float)acc[d - d0];
    }
}

/* ---- bf16 variants ----------------------------------------------------------
 * The bf16 layernorm variants widen into ctx->workspace like every other
 * half variant: they are in half_variants.inc (bf16.c).  SiLU, repeat_kv and
 * bias_add below work on bf16 directly. */
/* SiLU: elementwise, so chunks widened on the stack need no workspace (the
 * fp32 kernel on each chunk, serially; the chunks spread over the team) */
#define KL_CHUNK 1024

static moek_ctx kl_serial(const moek_ctx *ctx)
{
    moek_ctx one;
    if (ctx)
        one = *ctx;
    else
        memset(&one, 0, sizeof one);
    one.num_threads = 1;
    return one;
}

void moek_silu_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *x, moek_bf16 *y, int64_t n)
{
    moek_ctx one = kl_serial(ctx);
    int64_t chunks = n > 0 ? (n + KL_CHUNK - 1) / KL_CHUNK : 0;
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, 8 * n))
    for (int64_t c = 0; c < chunks; c++) {
        float a[KL_CHUNK], r[KL_CHUNK];
        int64_t o = c * KL_CHUNK, m = n - o < KL_CHUNK ? n - o : KL_CHUNK;
        for (int64_t i = 0; i < m; i++)
            a[i] = moek_bf16_to_f32(x[o + i]);
        moek_silu_fwd(&one, a, r, m);
        for (int64_t i = 0; i < m; i++)
            y[o + i] = moek_bf16_from_f32(r[i]);
    }
}

void moek_silu_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, const moek_bf16 *x, moek_bf16 *dx,
                        int64_t n)
{
    moek_ctx one = kl_serial(ctx);
    int64_t chunks = n > 0 ? (n + KL_CHUNK - 1) / KL_CHUNK : 0;
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, 8 * n))
    for (int64_t c = 0; c < chunks; c++) {
        float d[KL_CHUNK], a[KL_CHUNK], r[KL_CHUNK];
        int64_t o = c * KL_CHUNK, m = n - o < KL_CHUNK ? n - o : KL_CHUNK;
        for (int64_t i = 0; i < m; i++) {
            d[i] = moek_bf16_to_f32(dy[o + i]);
            a[i] = moek_bf16_to_f32(x[o + i]);
        }
        moek_silu_bwd(&one, d, a, r, m);
        for (int64_t i = 0; i < m; i++)
            dx[o + i] = moek_bf16_from_f32(r[i]);
    }
}

/* repeat_kv forward moves values without arithmetic: a bf16 copy */
void moek_repeat_kv_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *x, moek_bf16 *y, int64_t N,
                             int64_t Hkv, int64_t H, int64_t Dh)
{
    if (!kl_kv_ok(ctx, N, Hkv, H, Dh))
        return;
    int64_t rep = H / Hkv;
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, N * H * Dh))
    for (int64_t n = 0; n < N; n++)
        for (int64_t h = 0; h < H; h++)
            memcpy(y + (n * H + h) * Dh, x + (n * Hkv + h / rep) * Dh, (size_t)Dh * sizeof *y);
}

/* the fp32 kernel's sums, in the same order, rounded once */
void moek_repeat_kv_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, moek_bf16 *dx, int64_t N,
                             int64_t Hkv, int64_t H, int64_t Dh)
{
    if (!kl_kv_ok(ctx, N, Hkv, H, Dh))
        return;
    int64_t rep = H / Hkv;
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, N * H * Dh))
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < Hkv; k++)
            for (int64_t d = 0; d < Dh; d++) {
                float s = 0.0f;
                for (int64_t g = 0; g < rep; g++)
                    s += moek_bf16_to_f32(dy[(n * H + k * rep + g) * Dh + d]);
                dx[(n * Hkv + k) * Dh + d] = moek_bf16_from_f32(s);
            }
}

void moek_bias_add_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *x, const moek_bf16 *b,
                            moek_bf16 *y, int64_t N, int64_t D)
{
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, N * D))
    for (int64_t n = 0; n < N; n++)
        for (int64_t d = 0; d < D; d++)
            y[n * D + d] = moek_bf16_from_f32(moek_bf16_to_f32(x[n * D + d]) + moek_bf16_to_f32(b[d]));
}

void moek_bias_add_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, moek_bf16 *dx, moek_bf16 *db,
                            int64_t N, int64_t D)
{
    if (N < 0 || D < 0) {
        kcpu_fail(ctx, MOEK_E_SHAPE);
        return;
    }
    if (dx && dx != dy && N * D > 0)
        memcpy(dx, dy, (size_t)(N * D) * sizeof *dx);   /* widen + round is the identity */
    if (!db)
        return;
    int64_t nchunks = (D + KL_COLS - 1) / KL_COLS;
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, N * D))
    for (int64_t c = 0; c < nchunks; c++) {
        int64_t d0 = c * KL_COLS, d1 = d0 + KL_COLS < D ? d0 + KL_COLS : D;
        double acc[KL_COLS] = {0};
        for (int64_t n = 0; n < N; n++)
            for (int64_t d = d0; d < d1; d++)
                acc[d - d0] += moek_bf16_to_f32(dy[n * D + d]);
        for (int64_t d = d0; d < d1; d++)
            db[d] = moek_bf16_from_f32((float)acc[d - d0]);
    }
}
