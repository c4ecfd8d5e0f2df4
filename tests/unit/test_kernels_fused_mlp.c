/* test_kernels_fused_mlp.c - a linear layer fused with its bias and GELU
 * (moek_matmul_bias_gelu_*) and with its bias alone (moek_matmul_bias_*),
 * kernels/cpu/fused.c.
 *
 * Each against the composition of the kernels it replaces (matmul_fwd,
 * bias_add_fwd, gelu_fwd; gelu_bwd, bias_add_bwd, matmul_bwd), bit for bit
 * in fp32, bf16 and f16; each backward against central finite differences
 * of its forward (loss summed in fp64); the workspace errors. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../kernels/moek.h"
#include "check.h"
#include "test_kernels_cpu.h"

/* one seeded stream for the file, drawn in call order */
static tk_rng tm_gen = {0x9E3779B97F4A7C15ull};
#define tm_unif(lo, hi) tk_unif(&tm_gen, lo, hi)
#define tm_rand(n, lo, hi) tk_rand(&tm_gen, n, lo, hi)
#define tm_nan(n) tk_fill(n, NAN)
#define tm_same(a, b, bytes) tk_same(a, b, bytes)

/* fp32, gelu = 1 (matmul_bias_gelu) or 0 (matmul_bias): fused == unfused */
static void tm_fp32(const moek_ctx *ctx, int gelu, int64_t N, int64_t K, int64_t M)
{
    int64_t nk = N * K, mk = M * K, nm = N * M;
    const char *op = gelu ? "matmul_bias_gelu" : "matmul_bias";
    float *x = tm_rand(nk, -1, 1), *w = tm_rand(mk, -0.5f, 0.5f), *b = tm_rand(M, -1, 1), *dy = tm_rand(nm, -1, 1);
    float *pre = tm_nan(nm), *y = tm_nan(nm), *h0 = tm_nan(nm), *pre0 = tm_nan(nm), *y0 = tm_nan(nm);
    if (gelu)
        moek_matmul_bias_gelu_fwd(ctx, x, w, b, pre, y, N, K, M);
    else
        moek_matmul_bias_fwd(ctx, x, w, b, pre, N, K, M);
    moek_matmul_fwd(ctx, x, w, h0, N, K, M);
    moek_bias_add_fwd(ctx, h0, b, pre0, N, M);
    moek_gelu_fwd(ctx, pre0, y0, nm);
    char name[128];
    snprintf(name, sizeof name, "fused %s_fwd == matmul + bias_add%s (fp32, %lldx%lldx%lld)", op,
             gelu ? " + gelu" : "", (long long)N, (long long)K, (long long)M);
    int fwd_ok = tm_same(pre, pre0, nm * 4) && (!gelu || tm_same(y, y0, nm * 4)) && !isnan(pre[nm - 1]);
    CHECK(name, fwd_ok, "pre %d y %d", tm_same(pre, pre0, nm * 4), tm_same(y, y0, nm * 4));

    float *dx = tm_nan(nk), *dw = tm_nan(mk), *db = tm_nan(M);
    float *dp0 = tm_nan(nm), *dh0 = tm_nan(nm), *dx0 = tm_nan(nk), *dw0 = tm_nan(mk), *db0 = tm_nan(M);
    if (gelu) {
        moek_matmul_bias_gelu_bwd(ctx, dy, x, w, pre, dx, dw, db, N, K, M);
        moek_gelu_bwd(ctx, dy, pre0, dp0, nm);
    } else {
        moek_matmul_bias_bwd(ctx, dy, x, w, dx, dw, db, N, K, M);
        memcpy(dp0, dy, (size_t)nm * 4);
    }
    moek_bias_add_bwd(ctx, dp0, dh0, db0, N, M);
    moek_matmul_bwd(ctx, dh0, x, w, dx0, dw0, N, K, M);
    snprintf(name, sizeof name, "fused %s_bwd == %sbias_add_bwd + matmul_bwd (fp32, %lldx%lldx%lld)", op,
             gelu ? "gelu_bwd + " : "", (long long)N, (long long)K, (long long)M);
    CHECK(name, tm_same(dx, dx0, nk * 4) && tm_same(dw, dw0, mk * 4) && tm_same(db, db0, M * 4) && !isnan(db[0]),
          "dx %d dw %d db %d", tm_same(dx, dx0, nk * 4), tm_same(dw, dw0, mk * 4), tm_same(db, db0, M * 4));

    if (gelu) {   /* too small a workspace for dpre: MOEK_E_SHAPE, nothing written */
        int st = 0;
        moek_ctx small = *ctx;
        small.status = &st;
        small.workspace_bytes = MOEK_BF16_WORKSPACE_BYTES(nm) - 1;
        float *keep = tm_nan(nk > mk ? nk : mk);
        moek_matmul_bias_gelu_bwd(&small, dy, x, w, pre, keep, keep, keep, N, K, M);
        snprintf(name, sizeof name, "fused matmul_bias_gelu_bwd: small workspace is MOEK_E_SHAPE (%lldx%lldx%lld)",
                 (long long)N, (long long)K, (long long)M);
        CHECK(name, st == MOEK_E_SHAPE && isnan(keep[0]) && isnan(keep[M - 1]), "status %d", st);
        free(keep);
    }
    free(x), free(w), free(b), free(dy), free(pre), free(y), free(h0), free(pre0), free(y0);
    free(dx), free(dw), free(db), free(dp0), free(dh0), free(dx0), free(dw0), free(db0);
}

static float tm_maxrel(const float *a, const float *b, int64_t n, float floor_)
{
    float worst = 0;
    for (int64_t i = 0; i < n; i++) {
        float d = fabsf(a[i] - b[i]) / fmaxf(fabsf(b[i]), floor_);
        worst = isnan(d) ? INFINITY : d > worst ? d : worst;
    }
    return worst;
}

/* L = sum dy * y in fp64; central differences of the fused forward over
 * every coordinate of x, w and b */
static void tm_fd(const moek_ctx *ctx, int gelu, int64_t N, int64_t K, int64_t M)
{
    int64_t nk = N * K, mk = M * K, nm = N * M;
    float *x = tm_rand(nk, -1, 1), *w = tm_rand(mk, -1, 1), *b = tm_rand(M, -1, 1), *dy = tm_rand(nm, -1, 1);
    float *pre = tm_nan(nm), *y = tm_nan(nm), *dx = tm_nan(nk), *dw = tm_nan(mk), *db = tm_nan(M);
    if (gelu) {
        moek_matmul_bias_gelu_fwd(ctx, x, w, b, pre, y, N, K, M);
        moek_matmul_bias_gelu_bwd(ctx, dy, x, w, pre, dx, dw, db, N, K, M);
    } else {
        moek_matmul_bias_fwd(ctx, x, w, b, y, N, K, M);
        moek_matmul_bias_bwd(ctx, dy, x, w, dx, dw, db, N, K, M);
    }
    float *param[3] = {x, w, b}, *an[3] = {dx, dw, db};
    int64_t len[3] = {nk, mk, M};
    float worst[3] = {0, 0, 0};
    const float h = 1e-2f;
    for (int p = 0; p < 3; p++) {
        float *num = tm_nan(len[p]);
        for (int64_t i = 0; i < len[p]; i++) {
            double l[2];
            float keep = param[p][i];
            for (int sgn = 0; sgn < 2; sgn++) {
                param[p][i] = keep + (sgn ? -h : h);
                if (gelu)
                    moek_matmul_bias_gelu_fwd(ctx, x, w, b, pre, y, N, K, M);
                else
                    moek_matmul_bias_fwd(ctx, x, w, b, y, N, K, M);
                l[sgn] = 0;
                for (int64_t j = 0; j < nm; j++)
                    l[sgn] += (double)dy[j] * y[j];
            }
            param[p][i] = keep;
            num[i] = (float)((l[0] - l[1]) / (2.0 * h));
        }
        worst[p] = tm_maxrel(an[p], num, len[p], 0.05f);
        free(num);
    }
    char name[128];
    snprintf(name, sizeof name, "fused %s_bwd matches finite differences (%lldx%lldx%lld)",
             gelu ? "matmul_bias_gelu" : "matmul_bias", (long long)N, (long long)K, (long long)M);
    CHECK(name, worst[0] < 2e-2f && worst[1] < 2e-2f && worst[2] < 2e-2f, "worst relative error dx %g dw %g db %g",
          worst[0], worst[1], worst[2]);
    printf("# %s finite differences: worst relative error dx %.3g dw %.3g db %.3g\n",
           gelu ? "matmul_bias_gelu" : "matmul_bias", worst[0], worst[1], worst[2]);
    free(x), free(w), free(b), free(dy), free(pre), free(y), free(dx), free(dw), free(db);
}

/* ---- half storage: the fused variants against the unfused half kernels --- */
typedef struct {
    const char *name;
    void (*cast)(const moek_ctx *, const float *, uint16_t *, int64_t);
    void (*mf)(const moek_ctx *, const uint16_t *, const uint16_t *, uint16_t *, int64_t, int64_t, int64_t);
    void (*mb)(const moek_ctx *, const uint16_t *, const uint16_t *, const uint16_t *, uint16_t *, uint16_t *,
               int64_t, int64_t, int64_t);
    void (*bf)(const moek_ctx *, const uint16_t *, const uint16_t *, uint16_t *, int64_t, int64_t);
    void (*bb)(const moek_ctx *, const uint16_t *, uint16_t *, uint16_t *, int64_t, int64_t);
    void (*gf)(const moek_ctx *, const uint16_t *, uint16_t *, int64_t);
    void (*gb)(const moek_ctx *, const uint16_t *, const uint16_t *, uint16_t *, int64_t);
    void (*ff)(const moek_ctx *, const uint16_t *, const uint16_t *, const uint16_t *, uint16_t *, uint16_t *,
               int64_t, int64_t, int64_t);
    void (*fb)(const moek_ctx *, const uint16_t *, const uint16_t *, const uint16_t *, const uint16_t *,
               uint16_t *, uint16_t *, uint16_t *, int64_t, int64_t, int64_t);
    void (*pf)(const moek_ctx *, const uint16_t *, const uint16_t *, const uint16_t *, uint16_t *, int64_t,
               int64_t, int64_t);
    void (*pb)(const moek_ctx *, const uint16_t *, const uint16_t *, const uint16_t *, uint16_t *, uint16_t *,
               uint16_t *, int64_t, int64_t, int64_t);
} tm_half;

static uint16_t *tm_hrand(const moek_ctx *ctx, const tm_half *h, int64_t n, float lo, float hi)
{
    float *f = tm_rand(n, lo, hi);
    uint16_t *p = malloc((size_t)(n > 0 ? n : 1) * 2);
    h->cast(ctx, f, p, n);
    free(f);
    return p;
}

static uint16_t *tm_hbuf(int64_t n)
{
    uint16_t *p = malloc((size_t)(n > 0 ? n : 1) * 2);
    memset(p, 0xff, (size_t)(n > 0 ? n : 1) * 2);   /* NaN in both formats */
    return p;
}

static void tm_halfcase(const moek_ctx *ctx, const tm_half *h, int64_t N, int64_t K, int64_t M)
{
    int64_t nk = N * K, mk = M * K, nm = N * M;
    uint16_t *x = tm_hrand(ctx, h, nk, -1, 1), *w = tm_hrand(ctx, h, mk, -0.5f, 0.5f),
             *b = tm_hrand(ctx, h, M, -1, 1), *dy = tm_hrand(ctx, h, nm, -1, 1);
    uint16_t *pre = tm_hbuf(nm), *y = tm_hbuf(nm), *yb = tm_hbuf(nm), *h0 = tm_hbuf(nm), *pre0 = tm_hbuf(nm),
             *y0 = tm_hbuf(nm);
    /* the compiler reserves MOEK_BF16_WORKSPACE_BYTES(the call's half elements) */
    int st = 0;
    moek_ctx exact = *ctx;
    exact.status = &st;
    exact.workspace_bytes = MOEK_BF16_WORKSPACE_BYTES(nk + mk + M + 2 * nm);
    h->ff(&exact, x, w, b, pre, y, N, K, M);
    exact.workspace_bytes = MOEK_BF16_WORKSPACE_BYTES(nk + mk + M + nm);
    h->pf(&exact, x, w, b, yb, N, K, M);
    h->mf(ctx, x, w, h0, N, K, M);
    h->bf(ctx, h0, b, pre0, N, M);
    h->gf(ctx, pre0, y0, nm);
    char name[128];
    snprintf(name, sizeof name, "fused matmul_bias(_gelu)_fwd_%s == matmul + bias_add (+ gelu) (%lldx%lldx%lld)",
             h->name, (long long)N, (long long)K, (long long)M);
    CHECK(name, tm_same(pre, pre0, nm * 2) && tm_same(y, y0, nm * 2) && tm_same(yb, pre0, nm * 2) && st == 0,
          "pre %d y %d bias-only y %d status %d", tm_same(pre, pre0, nm * 2), tm_same(y, y0, nm * 2),
          tm_same(yb, pre0, nm * 2), st);

    uint16_t *dx = tm_hbuf(nk), *dw = tm_hbuf(mk), *db = tm_hbuf(M), *px = tm_hbuf(nk), *pw = tm_hbuf(mk),
             *pbb = tm_hbuf(M);
    uint16_t *dp0 = tm_hbuf(nm), *dh0 = tm_hbuf(nm), *dx0 = tm_hbuf(nk), *dw0 = tm_hbuf(mk), *db0 = tm_hbuf(M),
             *dh1 = tm_hbuf(nm), *dx1 = tm_hbuf(nk), *dw1 = tm_hbuf(mk), *db1 = tm_hbuf(M);
    exact.workspace_bytes = MOEK_BF16_WORKSPACE_BYTES(2 * nm + 2 * nk + 2 * mk + M);
    h->fb(&exact, dy, x, w, pre, dx, dw, db, N, K, M);
    exact.workspace_bytes = MOEK_BF16_WORKSPACE_BYTES(nm + 2 * nk + 2 * mk + M);
    h->pb(&exact, dy, x, w, px, pw, pbb, N, K, M);
    h->gb(ctx, dy, pre0, dp0, nm);
    h->bb(ctx, dp0, dh0, db0, N, M);
    h->mb(ctx, dh0, x, w, dx0, dw0, N, K, M);
    h->bb(ctx, dy, dh1, db1, N, M);
    h->mb(ctx, dh1, x, w, dx1, dw1, N, K, M);
    snprintf(name, sizeof name, "fused matmul_bias(_gelu)_bwd_%s == (gelu_bwd +) bias_add_bwd + matmul_bwd "
             "(%lldx%lldx%lld)", h->name, (long long)N, (long long)K, (long long)M);
    int ok = tm_same(dx, dx0, nk * 2) && tm_same(dw, dw0, mk * 2) && tm_same(db, db0, M * 2) &&
             tm_same(px, dx1, nk * 2) && tm_same(pw, dw1, mk * 2) && tm_same(pbb, db1, M * 2) && st == 0;
    CHECK(name, ok, "gelu: dx %d dw %d db %d; bias only: dx %d dw %d db %d; status %d", tm_same(dx, dx0, nk * 2),
          tm_same(dw, dw0, mk * 2), tm_same(db, db0, M * 2), tm_same(px, dx1, nk * 2), tm_same(pw, dw1, mk * 2),
          tm_same(pbb, db1, M * 2), st);

    /* too small a workspace: MOEK_E_SHAPE, nothing written */
    moek_ctx small = *ctx;
    small.status = &st;
    small.workspace_bytes = 64;
    uint16_t *keep = tm_hbuf(nm), *ref = tm_hbuf(nm);
    h->ff(&small, x, w, b, keep, keep, N, K, M);
    snprintf(name, sizeof name, "fused matmul_bias_gelu_fwd_%s: small workspace is MOEK_E_SHAPE (%lldx%lldx%lld)",
             h->name, (long long)N, (long long)K, (long long)M);
    CHECK(name, st == MOEK_E_SHAPE && tm_same(keep, ref, nm * 2), "status %d", st);
    free(x), free(w), free(b), free(dy), free(pre), free(y), free(yb), free(h0), free(pre0), free(y0);
    free(dx), free(dw), free(db), free(px), free(pw), free(pbb), free(dp0), free(dh0), free(dx0), free(dw0);
    free(db0), free(dh1), free(dx1), free(dw1), free(db1), free(keep), free(ref);
}

int main(void)
{
    int status = 0;
    moek_ctx ctx = {0};
    ctx.status = &status;
    ctx.workspace_bytes = MOEK_BF16_WORKSPACE_BYTES(1 << 20);
    ctx.workspace = malloc((size_t)ctx.workspace_bytes);
    for (int gelu = 0; gelu < 2; gelu++) {
        tm_fp32(&ctx, gelu, 5, 7, 3);
        tm_fp32(&ctx, gelu, 256, 64, 96);   /* big enough for the OpenMP and BLAS paths */
        tm_fd(&ctx, gelu, 3, 4, 5);
    }
    const tm_half halves[] = {
        {"bf16", moek_cast_f32_bf16, moek_matmul_fwd_bf16, moek_matmul_bwd_bf16, moek_bias_add_fwd_bf16,
         moek_bias_add_bwd_bf16, moek_gelu_fwd_bf16, moek_gelu_bwd_bf16, moek_matmul_bias_gelu_fwd_bf16,
         moek_matmul_bias_gelu_bwd_bf16, moek_matmul_bias_fwd_bf16, moek_matmul_bias_bwd_bf16},
        {"f16", moek_cast_f32_f16, moek_matmul_fwd_f16, moek_matmul_bwd_f16, moek_bias_add_fwd_f16,
         moek_bias_add_bwd_f16, moek_gelu_fwd_f16, moek_gelu_bwd_f16, moek_matmul_bias_gelu_fwd_f16,
         moek_matmul_bias_gelu_bwd_f16, moek_matmul_bias_fwd_f16, moek_matmul_bias_bwd_f16},
    };
    for (int i = 0; i < 2; i++) {
        tm_halfcase(&ctx, &halves[i], 6, 9, 5);
        tm_halfcase(&ctx, &halves[i], 200, 64, 96);
    }
    CHECK("fused linear kernels leave status 0", status == 0, "status %d", status);
    free(ctx.workspace);
    CHECK_DONE();
}
