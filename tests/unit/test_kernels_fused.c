/* test_kernels_fused.c - the CPU fused kernels (kernels/cpu/fused.c).
 *
 * Residual add + RMSNorm against the composition of the kernels it fuses
 * (moek_add_fwd then moek_rmsnorm_fwd; moek_rmsnorm_bwd then moek_add_fwd
 * for the gradient sum), bit for bit in fp32, bf16 and f16; its backward
 * against central finite differences of its forward; the half variants'
 * workspace error. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../kernels/moek.h"
#include "check.h"

static uint64_t tf_rng = 0x2545F4914F6CDD1Dull;

static float tf_unif(float lo, float hi)
{
    tf_rng ^= tf_rng >> 12;
    tf_rng ^= tf_rng << 25;
    tf_rng ^= tf_rng >> 27;
    uint64_t r = tf_rng * 2685821657736338717ull;
    return lo + (hi - lo) * (float)((r >> 40) / (double)(1ull << 24));
}

static float *tf_rand(int64_t n, float lo, float hi)
{
    float *p = malloc((size_t)n * sizeof *p);
    for (int64_t i = 0; i < n; i++)
        p[i] = tf_unif(lo, hi);
    return p;
}

static float *tf_nan(int64_t n)
{
    float *p = malloc((size_t)n * sizeof *p);
    for (int64_t i = 0; i < n; i++)
        p[i] = NAN;
    return p;
}

static int tf_same(const void *a, const void *b, int64_t bytes) { return memcmp(a, b, (size_t)bytes) == 0; }

/* fp32: fused == unfused, bit for bit */
static void tf_fp32(const moek_ctx *ctx, int64_t N, int64_t D)
{
    int64_t n = N * D;
    float *a = tf_rand(n, -2, 2), *b = tf_rand(n, -2, 2), *w = tf_rand(D, 0.5f, 1.5f);
    float *s = tf_nan(n), *y = tf_nan(n), *r = tf_nan(N), *s0 = tf_nan(n), *y0 = tf_nan(n), *r0 = tf_nan(N);
    moek_add_rmsnorm_fwd(ctx, a, b, w, s, y, r, N, D, 1e-5f);
    moek_add_fwd(ctx, a, b, s0, n);
    moek_rmsnorm_fwd(ctx, s0, w, y0, r0, N, D, 1e-5f);
    char name[96];
    snprintf(name, sizeof name, "fused add_rmsnorm_fwd == add + rmsnorm (fp32, %lldx%lld)", (long long)N,
             (long long)D);
    CHECK(name, tf_same(s, s0, n * 4) && tf_same(y, y0, n * 4) && tf_same(r, r0, N * 4) && !isnan(y[n - 1]),
          "s %d y %d rstd %d", tf_same(s, s0, n * 4), tf_same(y, y0, n * 4), tf_same(r, r0, N * 4));

    float *dy = tf_rand(n, -1, 1), *ds = tf_rand(n, -1, 1);
    float *da = tf_nan(n), *db = tf_nan(n), *dw = tf_nan(D), *dx0 = tf_nan(n), *dw0 = tf_nan(D), *g0 = tf_nan(n);
    moek_add_rmsnorm_bwd(ctx, dy, ds, s, w, r, da, db, dw, N, D);
    moek_rmsnorm_bwd(ctx, dy, s0, w, r0, dx0, dw0, N, D);
    moek_add_fwd(ctx, dx0, ds, g0, n);   /* autodiff's gradient sum, then add's pass-through */
    snprintf(name, sizeof name, "fused add_rmsnorm_bwd == rmsnorm_bwd + gradient sum (fp32, %lldx%lld)",
             (long long)N, (long long)D);
    CHECK(name, tf_same(da, g0, n * 4) && tf_same(db, g0, n * 4) && tf_same(dw, dw0, D * 4) && !isnan(dw[0]),
          "da %d db %d dw %d", tf_same(da, g0, n * 4), tf_same(db, g0, n * 4), tf_same(dw, dw0, D * 4));

    /* finite differences of L = sum(gy y) + sum(gs s) (dy = gy, ds = gs) */
    double worst = 0;
    for (int probe = 0; probe < 12; probe++) {
        int which = probe % 3;   /* a, b, w */
        int64_t i = (int64_t)(tf_unif(0, 1) * (float)(which == 2 ? D : n)) % (which == 2 ? D : n);
        float *x = which == 0 ? a : which == 1 ? b : w;
        float keep = x[i], h = 1e-2f;
        double L[2];
        for (int side = 0; side < 2; side++) {
            x[i] = keep + (side ? -h : h);
            moek_add_rmsnorm_fwd(ctx, a, b, w, s0, y0, r0, N, D, 1e-5f);
            double acc = 0;
            for (int64_t k = 0; k < n; k++)
                acc += (double)dy[k] * y0[k] + (double)ds[k] * s0[k];
            L[side] = acc;
        }
        x[i] = keep;
        double fd = (L[0] - L[1]) / (2.0 * h);
        double an = which == 0 ? da[i] : which == 1 ? db[i] : dw[i];
        double err = fabs(fd - an) / (fabs(an) + 1e-2);
        worst = err > worst ? err : worst;
    }
    snprintf(name, sizeof name, "fused add_rmsnorm_bwd matches finite differences (%lldx%lld)", (long long)N,
             (long long)D);
    CHECK(name, worst < 2e-2, "worst relative error %.3g", worst);
    printf("# finite differences %lldx%lld: worst relative error %.3g\n", (long long)N, (long long)D, worst);
    free(a), free(b), free(w), free(s), free(y), free(r), free(s0), free(y0), free(r0);
    free(dy), free(ds), free(da), free(db), free(dw), free(dx0), free(dw0), free(g0);
}

/* half storage: the fused variant against the unfused half kernels */
typedef struct {
    const char *name;
    void (*cast)(const moek_ctx *, const float *, uint16_t *, int64_t);
    void (*add)(const moek_ctx *, const uint16_t *, const uint16_t *, uint16_t *, int64_t);
    void (*nf)(const moek_ctx *, const uint16_t *, const uint16_t *, uint16_t *, float *, int64_t, int64_t, float);
    void (*nb)(const moek_ctx *, const uint16_t *, const uint16_t *, const uint16_t *, const float *, uint16_t *,
               uint16_t *, int64_t, int64_t);
    void (*ff)(const moek_ctx *, const uint16_t *, const uint16_t *, const uint16_t *, uint16_t *, uint16_t *,
               float *, int64_t, int64_t, float);
    void (*fb)(const moek_ctx *, const uint16_t *, const uint16_t *, const uint16_t *, const uint16_t *,
               const float *, uint16_t *, uint16_t *, uint16_t *, int64_t, int64_t);
} tf_half;

static uint16_t *tf_hrand(const moek_ctx *ctx, const tf_half *h, int64_t n, float lo, float hi)
{
    float *f = tf_rand(n, lo, hi);
    uint16_t *p = malloc((size_t)n * 2);
    h->cast(ctx, f, p, n);
    free(f);
    return p;
}

static uint16_t *tf_hbuf(int64_t n)
{
    uint16_t *p = malloc((size_t)n * 2);
    memset(p, 0xff, (size_t)n * 2);   /* NaN in both formats */
    return p;
}

static void tf_halfcase(const moek_ctx *ctx, const tf_half *h, int64_t N, int64_t D)
{
    int64_t n = N * D;
    uint16_t *a = tf_hrand(ctx, h, n, -2, 2), *b = tf_hrand(ctx, h, n, -2, 2), *w = tf_hrand(ctx, h, D, 0.5f, 1.5f);
    uint16_t *s = tf_hbuf(n), *y = tf_hbuf(n), *s0 = tf_hbuf(n), *y0 = tf_hbuf(n);
    float *r = tf_nan(N), *r0 = tf_nan(N);
    h->ff(ctx, a, b, w, s, y, r, N, D, 1e-5f);
    h->add(ctx, a, b, s0, n);
    h->nf(ctx, s0, w, y0, r0, N, D, 1e-5f);
    char name[96];
    snprintf(name, sizeof name, "fused add_rmsnorm_fwd_%s == add + rmsnorm (%lldx%lld)", h->name, (long long)N, (long long)D);
    CHECK(name, tf_same(s, s0, n * 2) && tf_same(y, y0, n * 2) && tf_same(r, r0, N * 4) && !isnan(r[0]),
          "s %d y %d rstd %d", tf_same(s, s0, n * 2), tf_same(y, y0, n * 2), tf_same(r, r0, N * 4));
    uint16_t *dy = tf_hrand(ctx, h, n, -1, 1), *ds = tf_hrand(ctx, h, n, -1, 1);
    uint16_t *da = tf_hbuf(n), *db = tf_hbuf(n), *dw = tf_hbuf(D), *dx0 = tf_hbuf(n), *dw0 = tf_hbuf(D),
             *g0 = tf_hbuf(n);
    h->fb(ctx, dy, ds, s, w, r, da, db, dw, N, D);
    h->nb(ctx, dy, s0, w, r0, dx0, dw0, N, D);
    h->add(ctx, dx0, ds, g0, n);
    snprintf(name, sizeof name, "fused add_rmsnorm_bwd_%s == rmsnorm_bwd + gradient sum (%lldx%lld)", h->name, (long long)N, (long long)D);
    CHECK(name, tf_same(da, g0, n * 2) && tf_same(db, g0, n * 2) && tf_same(dw, dw0, D * 2),
          "da %d db %d dw %d", tf_same(da, g0, n * 2), tf_same(db, g0, n * 2), tf_same(dw, dw0, D * 2));

    /* too small a workspace: MOEK_E_SHAPE and nothing written */
    int st = 0;
    moek_ctx small = *ctx;
    small.status = &st;
    small.workspace_bytes = 64;
    uint16_t *keep = tf_hbuf(n);
    h->ff(&small, a, b, w, keep, keep, r, N, D, 1e-5f);
    uint16_t *ref = tf_hbuf(n);
    snprintf(name, sizeof name, "fused add_rmsnorm_fwd_%s: small workspace is MOEK_E_SHAPE (%lldx%lld)", h->name, (long long)N, (long long)D);
    CHECK(name, st == MOEK_E_SHAPE && tf_same(keep, ref, n * 2), "status %d", st);
    free(a), free(b), free(w), free(s), free(y), free(s0), free(y0), free(r), free(r0), free(keep), free(ref);
    free(dy), free(ds), free(da), free(db), free(dw), free(dx0), free(dw0), free(g0);
}

int main(void)
{
    int status = 0;
    moek_ctx ctx = {0};
    ctx.status = &status;
    ctx.workspace_bytes = MOEK_BF16_WORKSPACE_BYTES(1 << 20);
    ctx.workspace = malloc((size_t)ctx.workspace_bytes);
    tf_fp32(&ctx, 7, 33);
    tf_fp32(&ctx, 512, 96);   /* big enough for the OpenMP paths */
    const tf_half halves[] = {
        {"bf16", moek_cast_f32_bf16, moek_add_fwd_bf16, moek_rmsnorm_fwd_bf16, moek_rmsnorm_bwd_bf16,
         moek_add_rmsnorm_fwd_bf16, moek_add_rmsnorm_bwd_bf16},
        {"f16", moek_cast_f32_f16, moek_add_fwd_f16, moek_rmsnorm_fwd_f16, moek_rmsnorm_bwd_f16,
         moek_add_rmsnorm_fwd_f16, moek_add_rmsnorm_bwd_f16},
    };
    for (int i = 0; i < 2; i++) {
        tf_halfcase(&ctx, &halves[i], 9, 40);
        tf_halfcase(&ctx, &halves[i], 300, 128);
    }
    CHECK("fused kernels leave status 0", status == 0, "status %d", status);
    free(ctx.workspace);
    CHECK_DONE();
}
