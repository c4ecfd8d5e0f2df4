/* test_kernels_fused.c - the CPU fused kernels (kernels/cpu/fused.c).
 *
 * Residual add + RMSNorm against the composition of the kernels it fuses
 * (moek_add_fwd then moek_rmsnorm_fwd; moek_rmsnorm_bwd then moek_add_fwd
 * for the gradient sum), bit for bit in fp32, bf16 and f16; its backward
 * against central finite differences of its forward; the half variants'
 * workspace error.  The same for SwiGLU with its projections (two matmuls
 * and swiglu; the backward's dx sum) and router softmax + top-k. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../kernels/moek.h"
#include "check.h"
#include "test_kernels_cpu.h"

/* one seeded stream for the file, drawn in call order */
static tk_rng tf_gen = {0x2545F4914F6CDD1Dull};
#define tf_unif(lo, hi) tk_unif(&tf_gen, lo, hi)
#define tf_rand(n, lo, hi) tk_rand(&tf_gen, n, lo, hi)
#define tf_nan(n) tk_fill(n, NAN)
#define tf_same(a, b, bytes) tk_same(a, b, bytes)

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

/* ---- SwiGLU with its projections ----------------------------------------- */
static float tf_maxrel(const float *a, const float *b, int64_t n, float floor_)
{
    float worst = 0;
    for (int64_t i = 0; i < n; i++) {
        float d = fabsf(a[i] - b[i]) / fmaxf(fabsf(b[i]), floor_);
        worst = d > worst || isnan(d) ? (isnan(d) ? INFINITY : d) : worst;
    }
    return worst;
}

/* fp32: fused == matmul, matmul, swiglu; backward == swiglu_bwd, two
 * matmul_bwd and the gradient sum of dx, bit for bit */
static void tf_swiglu_proj(const moek_ctx *ctx, int64_t N, int64_t K, int64_t M)
{
    int64_t nk = N * K, mk = M * K, nm = N * M;
    float *x = tf_rand(nk, -1, 1), *w1 = tf_rand(mk, -0.5f, 0.5f), *w3 = tf_rand(mk, -0.5f, 0.5f);
    float *g = tf_nan(nm), *u = tf_nan(nm), *y = tf_nan(nm), *g0 = tf_nan(nm), *u0 = tf_nan(nm), *y0 = tf_nan(nm);
    moek_swiglu_proj_fwd(ctx, x, w1, w3, g, u, y, N, K, M);
    moek_matmul_fwd(ctx, x, w1, g0, N, K, M);
    moek_matmul_fwd(ctx, x, w3, u0, N, K, M);
    moek_swiglu_fwd(ctx, g0, u0, y0, nm);
    char name[112];
    snprintf(name, sizeof name, "fused swiglu_proj_fwd == 2 matmul + swiglu (fp32, %lldx%lldx%lld)", (long long)N,
             (long long)K, (long long)M);
    CHECK(name, tf_same(g, g0, nm * 4) && tf_same(u, u0, nm * 4) && tf_same(y, y0, nm * 4) && !isnan(y[0]),
          "gate %d up %d y %d", tf_same(g, g0, nm * 4), tf_same(u, u0, nm * 4), tf_same(y, y0, nm * 4));
    float *dy = tf_rand(nm, -1, 1), *dx = tf_nan(nk), *dw1 = tf_nan(mk), *dw3 = tf_nan(mk);
    float *dg = tf_nan(nm), *du = tf_nan(nm), *dx1 = tf_nan(nk), *dx3 = tf_nan(nk), *dx0 = tf_nan(nk),
          *dw10 = tf_nan(mk), *dw30 = tf_nan(mk);
    moek_swiglu_proj_bwd(ctx, dy, x, w1, w3, g, u, dx, dw1, dw3, N, K, M);
    moek_swiglu_bwd(ctx, dy, g0, u0, dg, du, nm);
    moek_matmul_bwd(ctx, dg, x, w1, dx1, dw10, N, K, M);
    moek_matmul_bwd(ctx, du, x, w3, dx3, dw30, N, K, M);
    moek_add_fwd(ctx, dx3, dx1, dx0, nk);   /* the other order on purpose: IEEE a + b == b + a */
    snprintf(name, sizeof name, "fused swiglu_proj_bwd == swiglu_bwd + 2 matmul_bwd + sum (fp32, %lldx%lldx%lld)",
             (long long)N, (long long)K, (long long)M);
    CHECK(name, tf_same(dx, dx0, nk * 4) && tf_same(dw1, dw10, mk * 4) && tf_same(dw3, dw30, mk * 4),
          "dx %d dw1 %d dw3 %d", tf_same(dx, dx0, nk * 4), tf_same(dw1, dw10, mk * 4), tf_same(dw3, dw30, mk * 4));

    /* too small a workspace for dgate, dup, dx1: MOEK_E_SHAPE, nothing written */
    int st = 0;
    moek_ctx small = *ctx;
    small.status = &st;
    small.workspace_bytes = MOEK_BF16_WORKSPACE_BYTES(2 * nm + nk) - 1;
    float *keep = tf_nan(nk);
    moek_swiglu_proj_bwd(&small, dy, x, w1, w3, g, u, keep, keep, keep, N, K, M);
    snprintf(name, sizeof name, "fused swiglu_proj_bwd: small workspace is MOEK_E_SHAPE (%lldx%lldx%lld)",
             (long long)N, (long long)K, (long long)M);
    CHECK(name, st == MOEK_E_SHAPE && isnan(keep[0]) && isnan(keep[nk - 1]), "status %d", st);
    free(x), free(w1), free(w3), free(g), free(u), free(y), free(g0), free(u0), free(y0), free(dy), free(dx);
    free(dw1), free(dw3), free(dg), free(du), free(dx1), free(dx3), free(dx0), free(dw10), free(dw30), free(keep);
}

/* L = sum dy * y; central differences of the fused forward in fp32 */
static void tf_swiglu_proj_fd(const moek_ctx *ctx, int64_t N, int64_t K, int64_t M)
{
    int64_t nk = N * K, mk = M * K, nm = N * M;
    float *x = tf_rand(nk, -1, 1), *w[2] = {tf_rand(mk, -1, 1), tf_rand(mk, -1, 1)}, *dy = tf_rand(nm, -1, 1);
    float *g = tf_nan(nm), *u = tf_nan(nm), *y = tf_nan(nm), *dx = tf_nan(nk), *dw[2] = {tf_nan(mk), tf_nan(mk)};
    moek_swiglu_proj_fwd(ctx, x, w[0], w[1], g, u, y, N, K, M);
    moek_swiglu_proj_bwd(ctx, dy, x, w[0], w[1], g, u, dx, dw[0], dw[1], N, K, M);
    float *num[3] = {tf_nan(nk), tf_nan(mk), tf_nan(mk)}, *param[3] = {x, w[0], w[1]};
    int64_t len[3] = {nk, mk, mk};
    const float h = 1e-2f;
    for (int p = 0; p < 3; p++)
        for (int64_t i = 0; i < len[p]; i++) {
            double l[2];
            float keep = param[p][i];
            for (int sgn = 0; sgn < 2; sgn++) {
                param[p][i] = keep + (sgn ? -h : h);
                moek_swiglu_proj_fwd(ctx, x, w[0], w[1], g, u, y, N, K, M);
                l[sgn] = 0;
                for (int64_t j = 0; j < nm; j++)
                    l[sgn] += (double)dy[j] * y[j];
            }
            param[p][i] = keep;
            num[p][i] = (float)((l[0] - l[1]) / (2.0 * h));
        }
    float e0 = tf_maxrel(dx, num[0], nk, 0.05f), e1 = tf_maxrel(dw[0], num[1], mk, 0.05f),
          e2 = tf_maxrel(dw[1], num[2], mk, 0.05f);
    char name[112];
    snprintf(name, sizeof name, "fused swiglu_proj_bwd matches finite differences (%lldx%lldx%lld)", (long long)N,
             (long long)K, (long long)M);
    CHECK(name, e0 < 2e-2f && e1 < 2e-2f && e2 < 2e-2f, "worst relative error dx %g dw1 %g dw3 %g", e0, e1, e2);
    free(x), free(w[0]), free(w[1]), free(dy), free(g), free(u), free(y), free(dx), free(dw[0]), free(dw[1]);
    free(num[0]), free(num[1]), free(num[2]);
}

/* half: fused == the unfused half kernels, bit for bit */
typedef struct {
    const char *name;
    void (*cast)(const moek_ctx *, const float *, uint16_t *, int64_t);
    void (*add)(const moek_ctx *, const uint16_t *, const uint16_t *, uint16_t *, int64_t);
    void (*mf)(const moek_ctx *, const uint16_t *, const uint16_t *, uint16_t *, int64_t, int64_t, int64_t);
    void (*mb)(const moek_ctx *, const uint16_t *, const uint16_t *, const uint16_t *, uint16_t *, uint16_t *,
               int64_t, int64_t, int64_t);
    void (*sf)(const moek_ctx *, const uint16_t *, const uint16_t *, uint16_t *, int64_t);
    void (*sb)(const moek_ctx *, const uint16_t *, const uint16_t *, const uint16_t *, uint16_t *, uint16_t *,
               int64_t);
    void (*ff)(const moek_ctx *, const uint16_t *, const uint16_t *, const uint16_t *, uint16_t *, uint16_t *,
               uint16_t *, int64_t, int64_t, int64_t);
    void (*fb)(const moek_ctx *, const uint16_t *, const uint16_t *, const uint16_t *, const uint16_t *,
               const uint16_t *, const uint16_t *, uint16_t *, uint16_t *, uint16_t *, int64_t, int64_t, int64_t);
    void (*smf)(const moek_ctx *, const uint16_t *, float *, int64_t, int64_t);
    void (*smb)(const moek_ctx *, const float *, const float *, uint16_t *, int64_t, int64_t);
    void (*stf)(const moek_ctx *, const uint16_t *, float *, int32_t *, float *, int64_t, int64_t, int64_t, int64_t);
    void (*stb)(const moek_ctx *, const float *, const float *, const float *, const int32_t *, uint16_t *, int64_t,
                int64_t, int64_t, int64_t);
} tf_half2;

static void tf_swiglu_proj_half(const moek_ctx *ctx, const tf_half2 *h2, int64_t N, int64_t K, int64_t M)
{
    tf_half h = {h2->name, h2->cast, NULL, NULL, NULL, NULL, NULL};
    int64_t nk = N * K, mk = M * K, nm = N * M;
    uint16_t *x = tf_hrand(ctx, &h, nk, -1, 1), *w1 = tf_hrand(ctx, &h, mk, -0.5f, 0.5f),
             *w3 = tf_hrand(ctx, &h, mk, -0.5f, 0.5f), *dy = tf_hrand(ctx, &h, nm, -1, 1);
    uint16_t *g = tf_hbuf(nm), *u = tf_hbuf(nm), *y = tf_hbuf(nm), *g0 = tf_hbuf(nm), *u0 = tf_hbuf(nm),
             *y0 = tf_hbuf(nm);
    h2->ff(ctx, x, w1, w3, g, u, y, N, K, M);
    h2->mf(ctx, x, w1, g0, N, K, M);
    h2->mf(ctx, x, w3, u0, N, K, M);
    h2->sf(ctx, g0, u0, y0, nm);
    char name[112];
    snprintf(name, sizeof name, "fused swiglu_proj_fwd_%s == 2 matmul + swiglu (%lldx%lldx%lld)", h2->name,
             (long long)N, (long long)K, (long long)M);
    CHECK(name, tf_same(g, g0, nm * 2) && tf_same(u, u0, nm * 2) && tf_same(y, y0, nm * 2),
          "gate %d up %d y %d", tf_same(g, g0, nm * 2), tf_same(u, u0, nm * 2), tf_same(y, y0, nm * 2));
    uint16_t *dx = tf_hbuf(nk), *dw1 = tf_hbuf(mk), *dw3 = tf_hbuf(mk), *dg = tf_hbuf(nm), *du = tf_hbuf(nm),
             *dx1 = tf_hbuf(nk), *dx3 = tf_hbuf(nk), *dx0 = tf_hbuf(nk), *dw10 = tf_hbuf(mk), *dw30 = tf_hbuf(mk);
    h2->fb(ctx, dy, x, w1, w3, g, u, dx, dw1, dw3, N, K, M);
    h2->sb(ctx, dy, g0, u0, dg, du, nm);
    h2->mb(ctx, dg, x, w1, dx1, dw10, N, K, M);
    h2->mb(ctx, du, x, w3, dx3, dw30, N, K, M);
    h2->add(ctx, dx1, dx3, dx0, nk);
    snprintf(name, sizeof name, "fused swiglu_proj_bwd_%s == swiglu_bwd + 2 matmul_bwd + sum (%lldx%lldx%lld)",
             h2->name, (long long)N, (long long)K, (long long)M);
    CHECK(name, tf_same(dx, dx0, nk * 2) && tf_same(dw1, dw10, mk * 2) && tf_same(dw3, dw30, mk * 2),
          "dx %d dw1 %d dw3 %d", tf_same(dx, dx0, nk * 2), tf_same(dw1, dw10, mk * 2), tf_same(dw3, dw30, mk * 2));
    /* the compiler reserves MOEK_BF16_WORKSPACE_BYTES(half elements of the
     * call): that is enough for both directions */
    int st = 0;
    moek_ctx exact = *ctx;
    exact.status = &st;
    exact.workspace_bytes = MOEK_BF16_WORKSPACE_BYTES(nk + 2 * mk + 3 * nm);
    h2->ff(&exact, x, w1, w3, g, u, y, N, K, M);
    exact.workspace_bytes = MOEK_BF16_WORKSPACE_BYTES(3 * nm + 2 * nk + 4 * mk);
    h2->fb(&exact, dy, x, w1, w3, g, u, dx, dw1, dw3, N, K, M);
    snprintf(name, sizeof name, "fused swiglu_proj_%s fits the compiler's workspace (%lldx%lldx%lld)", h2->name,
             (long long)N, (long long)K, (long long)M);
    CHECK(name, st == 0 && tf_same(dx, dx0, nk * 2), "status %d", st);
    free(x), free(w1), free(w3), free(dy), free(g), free(u), free(y), free(g0), free(u0), free(y0), free(dx);
    free(dw1), free(dw3), free(dg), free(du), free(dx1), free(dx3), free(dx0), free(dw10), free(dw30);
}

/* ---- router softmax + top-k ---------------------------------------------- */
static void tf_softmax_topk(const moek_ctx *ctx, const tf_half2 *h2, int64_t N, int64_t E, int64_t k,
                            int64_t renorm)
{
    int64_t ne = N * E, nk = N * k;
    float *lf = tf_rand(ne, -3, 3), *dpr = tf_rand(ne, -1, 1), *dg = tf_rand(nk, -1, 1);
    uint16_t *lh = NULL;
    if (h2) {   /* the half logits, and the same values in fp32 for the unfused reference */
        tf_half h = {h2->name, h2->cast, NULL, NULL, NULL, NULL, NULL};
        lh = malloc((size_t)ne * 2);
        h.cast(ctx, lf, lh, ne);
    }
    float *p = tf_nan(ne), *g = tf_nan(nk), *p0 = tf_nan(ne), *g0 = tf_nan(nk);
    int32_t *ix = calloc((size_t)nk, 4), *ix0 = calloc((size_t)nk, 4);
    if (h2) {
        h2->stf(ctx, lh, p, ix, g, N, E, k, renorm);
        h2->smf(ctx, lh, p0, N, E);
    } else {
        moek_softmax_topk_fwd(ctx, lf, p, ix, g, N, E, k, renorm);
        moek_softmax_fwd(ctx, lf, p0, N, E);
    }
    moek_topk_fwd(ctx, p0, ix0, g0, N, E, k, renorm);
    const char *dt = h2 ? h2->name : "fp32";
    char name[112];
    snprintf(name, sizeof name, "fused softmax_topk_fwd == softmax + topk (%s, %lldx%lld k %lld renorm %lld)", dt,
             (long long)N, (long long)E, (long long)k, (long long)renorm);
    CHECK(name, tf_same(p, p0, ne * 4) && tf_same(ix, ix0, nk * 4) && tf_same(g, g0, nk * 4) && !isnan(g[0]),
          "probs %d idx %d gates %d", tf_same(p, p0, ne * 4), tf_same(ix, ix0, nk * 4), tf_same(g, g0, nk * 4));
    float *ds = tf_nan(ne), *sum = tf_nan(ne), *dl0 = tf_nan(ne), *dl = tf_nan(ne);
    uint16_t *dlh = h2 ? tf_hbuf(ne) : NULL, *dlh0 = h2 ? tf_hbuf(ne) : NULL;
    moek_topk_bwd(ctx, dg, p0, ix0, ds, N, E, k, renorm);
    moek_add_fwd(ctx, dpr, ds, sum, ne);
    if (h2) {
        h2->stb(ctx, dpr, dg, p, ix, dlh, N, E, k, renorm);
        h2->smb(ctx, sum, p0, dlh0, N, E);
    } else {
        moek_softmax_topk_bwd(ctx, dpr, dg, p, ix, dl, N, E, k, renorm);
        moek_softmax_bwd(ctx, sum, p0, dl0, N, E);
    }
    snprintf(name, sizeof name, "fused softmax_topk_bwd == topk_bwd + sum + softmax_bwd (%s, %lldx%lld k %lld)", dt,
             (long long)N, (long long)E, (long long)k);
    int same = h2 ? tf_same(dlh, dlh0, ne * 2) : tf_same(dl, dl0, ne * 4) && !isnan(dl[0]);
    CHECK(name, same, "dlogits differ");
    free(lf), free(dpr), free(dg), free(lh), free(p), free(g), free(p0), free(g0), free(ix), free(ix0);
    free(ds), free(sum), free(dl0), free(dl), free(dlh), free(dlh0);
}

/* L = sum dprobs * probs + sum dgates * gates; central differences, skipping
 * a coordinate whose step changes the selection */
static void tf_softmax_topk_fd(const moek_ctx *ctx, int64_t N, int64_t E, int64_t k, int64_t renorm)
{
    int64_t ne = N * E, nk = N * k;
    float *l = tf_rand(ne, -2, 2), *dpr = tf_rand(ne, -1, 1), *dg = tf_rand(nk, -1, 1);
    float *p = tf_nan(ne), *g = tf_nan(nk), *dl = tf_nan(ne), *num = tf_nan(ne);
    int32_t *ix = calloc((size_t)nk, 4), *ix2 = calloc((size_t)nk, 4);
    moek_softmax_topk_fwd(ctx, l, p, ix, g, N, E, k, renorm);
    moek_softmax_topk_bwd(ctx, dpr, dg, p, ix, dl, N, E, k, renorm);
    const float h = 1e-2f;
    float worst = 0;
    int used = 0;
    for (int64_t i = 0; i < ne; i++) {
        double L[2];
        float keep = l[i];
        int moved = 0;
        for (int sgn = 0; sgn < 2; sgn++) {
            l[i] = keep + (sgn ? -h : h);
            moek_softmax_topk_fwd(ctx, l, p, ix2, g, N, E, k, renorm);
            moved |= memcmp(ix, ix2, (size_t)nk * 4) != 0;
            L[sgn] = 0;
            for (int64_t j = 0; j < ne; j++)
                L[sgn] += (double)dpr[j] * p[j];
            for (int64_t j = 0; j < nk; j++)
                L[sgn] += (double)dg[j] * g[j];
        }
        l[i] = keep;
        if (moved)
            continue;
        used++;
        num[i] = (float)((L[0] - L[1]) / (2.0 * h));
        float e = fabsf(num[i] - dl[i]) / fmaxf(fabsf(dl[i]), 0.05f);
        worst = e > worst ? e : worst;
    }
    char name[112];
    snprintf(name, sizeof name, "fused softmax_topk_bwd matches finite differences (%lldx%lld k %lld renorm %lld)",
             (long long)N, (long long)E, (long long)k, (long long)renorm);
    CHECK(name, used > ne / 2 && worst < 2e-2f, "worst relative error %g over %d of %lld logits", worst, used,
          (long long)ne);
    free(l), free(dpr), free(dg), free(p), free(g), free(dl), free(num), free(ix), free(ix2);
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
    tf_swiglu_proj(&ctx, 5, 7, 3);
    tf_swiglu_proj(&ctx, 256, 64, 96);
    tf_swiglu_proj_fd(&ctx, 3, 4, 5);
    const tf_half2 h2[] = {
        {"bf16", moek_cast_f32_bf16, moek_add_fwd_bf16, moek_matmul_fwd_bf16, moek_matmul_bwd_bf16,
         moek_swiglu_fwd_bf16, moek_swiglu_bwd_bf16, moek_swiglu_proj_fwd_bf16, moek_swiglu_proj_bwd_bf16,
         moek_softmax_fwd_bf16, moek_softmax_bwd_bf16, moek_softmax_topk_fwd_bf16, moek_softmax_topk_bwd_bf16},
        {"f16", moek_cast_f32_f16, moek_add_fwd_f16, moek_matmul_fwd_f16, moek_matmul_bwd_f16,
         moek_swiglu_fwd_f16, moek_swiglu_bwd_f16, moek_swiglu_proj_fwd_f16, moek_swiglu_proj_bwd_f16,
         moek_softmax_fwd_f16, moek_softmax_bwd_f16, moek_softmax_topk_fwd_f16, moek_softmax_topk_bwd_f16},
    };
    for (int i = 0; i < 2; i++) {
        tf_swiglu_proj_half(&ctx, &h2[i], 6, 9, 5);
        tf_swiglu_proj_half(&ctx, &h2[i], 200, 64, 96);
        tf_softmax_topk(&ctx, &h2[i], 300, 8, 2, 1);
    }
    tf_softmax_topk(&ctx, NULL, 5, 4, 2, 1);
    tf_softmax_topk(&ctx, NULL, 600, 8, 2, 1);
    tf_softmax_topk(&ctx, NULL, 600, 8, 1, 0);
    tf_softmax_topk_fd(&ctx, 4, 6, 2, 1);
    tf_softmax_topk_fd(&ctx, 4, 6, 3, 0);
    CHECK("fused kernels leave status 0", status == 0, "status %d", status);
    free(ctx.workspace);
    CHECK_DONE();
}
