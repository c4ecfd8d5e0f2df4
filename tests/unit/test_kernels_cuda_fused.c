/* test_kernels_cuda_fused.c - the CUDA fused kernels (kernels/cuda/fused.cu)
 * against their CPU twins (kernels/cpu/fused.c, linked in).
 *
 * The CUDA library is dlopened from $MOEC_BUILD/libmoek_cuda.so (default
 * build/); without it or without a GPU this prints one SKIP line.  Random
 * inputs, GPU outputs poisoned with NaN; fp32 outputs within 1e-5 relative
 * (L2), bf16 and fp16 outputs within 1e-2 (a bf16 ulp is 2^-8 relative, an
 * fp16 one 2^-11, and a different sum order in the row statistic can move a
 * rounding).  Also SwiGLU with its projections and router softmax + top-k
 * (tolerances at tg_proj and tg_router).  Every case runs in fp32, then
 * bf16, then fp16 (one body: tg_half below), on the bf16 cases' input
 * ranges. */
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../kernels/moek.h"
#include "check.h"
#include "cuda_harness.h"

#define TG_SYMS(X)                                                                          \
    X(device_count) X(device_init) X(device_fini) X(device_alloc) X(device_free)            \
    X(device_copy) X(device_sync) X(add_rmsnorm_fwd) X(add_rmsnorm_bwd) X(swiglu_proj_fwd)  \
    X(swiglu_proj_bwd) X(softmax_topk_fwd) X(softmax_topk_bwd)

/* the half variants, by their names without the _bf16 / _f16 suffix */
#define TG_HALF(X)                                                                          \
    X(cast_f32) X(add_rmsnorm_fwd) X(add_rmsnorm_bwd) X(swiglu_proj_fwd) X(swiglu_proj_bwd) \
    X(softmax_topk_fwd) X(softmax_topk_bwd)

typedef struct {
#define TG_FIELD(n) __typeof__(&moek_##n) n;
    TG_SYMS(TG_FIELD)
#undef TG_FIELD
} tg_lib;

/* one library's half variants, typed as the _bf16 ones (cuda_harness.h) */
typedef struct {
#define TG_HFIELD(n) __typeof__(&moek_##n##_bf16) n;
    TG_HALF(TG_HFIELD)
#undef TG_HFIELD
} tg_hlib;

/* a half type: its descriptor and its variants in the CPU and CUDA libraries;
 * a case given NULL runs fp32 */
typedef struct {
    const ch_half *ty;
    tg_hlib c, g;
} tg_half;

typedef struct {
    tg_lib g;
    tg_half halves[CH_NHALF];
    ch_side s;   /* contexts, statuses, error text */
    uint64_t rng;
} tg_env;

/* a device copy of host bytes (or NaN bytes when h is NULL) */
static void *tg_up(tg_env *t, const void *h, int64_t bytes)
{
    void *d = t->g.device_alloc(&t->s.gctx, bytes, t->s.err, sizeof t->s.err);
    void *nan = NULL;
    if (!h) {
        nan = malloc((size_t)bytes);
        memset(nan, 0xff, (size_t)bytes);
        h = nan;
    }
    if (!d || t->g.device_copy(&t->s.gctx, d, h, bytes, MOEK_COPY_H2D, t->s.err, sizeof t->s.err)) {
        fprintf(stderr, "test_kernels_cuda_fused: %s\n", t->s.err);
        exit(2);
    }
    free(nan);
    return d;
}

static void *tg_down(tg_env *t, const void *d, int64_t bytes)
{
    void *h = malloc((size_t)bytes);
    if (t->g.device_copy(&t->s.gctx, h, d, bytes, MOEK_COPY_D2H, t->s.err, sizeof t->s.err)) {
        fprintf(stderr, "test_kernels_cuda_fused: %s\n", t->s.err);
        exit(2);
    }
    return h;
}

/* one case: N x D, fp32 (hk NULL) or the half type hk */
static void tg_case(tg_env *t, int64_t N, int64_t D, const tg_half *hk)
{
    int64_t n = N * D, es = hk ? 2 : 4;
    float *f[6];
    int64_t len[6] = {n, n, D, n, n, 0};
    for (int i = 0; i < 5; i++) {
        f[i] = malloc((size_t)len[i] * 4);
        for (int64_t j = 0; j < len[i]; j++)
            f[i][j] = i == 2 ? ch_unif(&t->rng, 0.5f, 1.5f) : ch_unif(&t->rng, -2, 2);
    }
    void *h[5];   /* a, b, w, dy, ds in the storage type */
    for (int i = 0; i < 5; i++) {
        h[i] = malloc((size_t)(len[i] * es));
        if (hk)
            hk->c.cast_f32(&t->s.cctx, f[i], h[i], len[i]);
        else
            memcpy(h[i], f[i], (size_t)len[i] * 4);
    }
    /* CPU */
    void *s = malloc((size_t)(n * es)), *y = malloc((size_t)(n * es)), *da = malloc((size_t)(n * es)),
         *db = malloc((size_t)(n * es)), *dw = malloc((size_t)(D * es));
    float *r = malloc((size_t)N * 4);
    if (hk) {
        hk->c.add_rmsnorm_fwd(&t->s.cctx, h[0], h[1], h[2], s, y, r, N, D, 1e-5f);
        hk->c.add_rmsnorm_bwd(&t->s.cctx, h[3], h[4], s, h[2], r, da, db, dw, N, D);
    } else {
        moek_add_rmsnorm_fwd(&t->s.cctx, h[0], h[1], h[2], s, y, r, N, D, 1e-5f);
        moek_add_rmsnorm_bwd(&t->s.cctx, h[3], h[4], s, h[2], r, da, db, dw, N, D);
    }
    /* GPU */
    void *d[5];
    for (int i = 0; i < 5; i++)
        d[i] = tg_up(t, h[i], len[i] * es);
    void *gs = tg_up(t, NULL, n * es), *gy = tg_up(t, NULL, n * es), *gr = tg_up(t, NULL, N * 4),
         *gda = tg_up(t, NULL, n * es), *gdb = tg_up(t, NULL, n * es), *gdw = tg_up(t, NULL, D * es);
    if (hk) {
        hk->g.add_rmsnorm_fwd(&t->s.gctx, d[0], d[1], d[2], gs, gy, gr, N, D, 1e-5f);
        hk->g.add_rmsnorm_bwd(&t->s.gctx, d[3], d[4], gs, d[2], gr, gda, gdb, gdw, N, D);
    } else {
        t->g.add_rmsnorm_fwd(&t->s.gctx, d[0], d[1], d[2], gs, gy, gr, N, D, 1e-5f);
        t->g.add_rmsnorm_bwd(&t->s.gctx, d[3], d[4], gs, d[2], gr, gda, gdb, gdw, N, D);
    }
    int rc = t->g.device_sync(&t->s.gctx, t->s.err, sizeof t->s.err);
    char name[96];
    snprintf(name, sizeof name, "cuda add_rmsnorm%s fwd+bwd %lldx%lld runs", hk ? hk->ty->suffix : "",
             (long long)N, (long long)D);
    CHECK(name, rc == 0 && t->s.gstatus == 0 && t->s.cstatus == 0, "sync %d (%s) gpu %d cpu %d", rc, t->s.err, t->s.gstatus, t->s.cstatus);
    const void *gdev[6] = {gs, gy, gr, gda, gdb, gdw};
    const void *cpu[6] = {s, y, r, da, db, dw};
    const char *what[6] = {"s", "y", "rstd", "da", "db", "dw"};
    int64_t cnt[6] = {n, n, N, n, n, D};
    double tol = hk ? 1e-2 : 1e-5, worst = 0;
    const char *wn = "";
    for (int i = 0; i < 6; i++) {
        const ch_half *ty = hk && i != 2 ? hk->ty : NULL;   /* rstd is fp32 */
        void *g = tg_down(t, gdev[i], cnt[i] * (ty ? 2 : 4));
        double e = ch_rel(g, cpu[i], cnt[i], ty);
        if (!(e <= worst)) {
            worst = e;
            wn = what[i];
        }
        free(g);
    }
    snprintf(name, sizeof name, "cuda add_rmsnorm%s == cpu %lldx%lld", hk ? hk->ty->suffix : "", (long long)N,
             (long long)D);
    CHECK(name, worst <= tol, "worst %s: %.3g > %.3g", wn, worst, tol);
    printf("# %s: worst relative error %.3g (%s)\n", name, worst, wn);
    for (int i = 0; i < 5; i++)
        free(f[i]), free(h[i]), t->g.device_free(&t->s.gctx, d[i]);
    void *gall[6] = {gs, gy, gr, gda, gdb, gdw};
    for (int i = 0; i < 6; i++)
        t->g.device_free(&t->s.gctx, gall[i]);
    free(s), free(y), free(da), free(db), free(dw), free(r);
}

/* random values of n elements in the storage type (fp32 when hk is NULL) */
static void *tg_rand(tg_env *t, int64_t n, float lo, float hi, const tg_half *hk)
{
    float *f = malloc((size_t)n * 4);
    for (int64_t j = 0; j < n; j++)
        f[j] = ch_unif(&t->rng, lo, hi);
    if (!hk)
        return f;
    void *h = malloc((size_t)n * 2);
    hk->c.cast_f32(&t->s.cctx, f, h, n);
    free(f);
    return h;
}

/* compares a device buffer with the CPU's (fp32 when ty is NULL); frees
 * the download */
static double tg_cmp(tg_env *t, const void *dev, const void *cpu, int64_t n, const ch_half *ty)
{
    void *g = tg_down(t, dev, n * (ty ? 2 : 4));
    double e = ch_rel(g, cpu, n, ty);
    free(g);
    return e;
}

/* SwiGLU with its projections: gate, up, y, dx, dw1, dw3 against the CPU.
 * fp32 within 1e-4 (cuBLAS and BLAS sum K terms in different orders), bf16
 * and fp16 within 2e-2 (a rounding of gate or up moved by that order moves y). */
static void tg_proj(tg_env *t, int64_t N, int64_t K, int64_t M, const tg_half *hk)
{
    int64_t es = hk ? 2 : 4, nk = N * K, mk = M * K, nm = N * M;
    void *x = tg_rand(t, nk, -1, 1, hk), *w1 = tg_rand(t, mk, -0.3f, 0.3f, hk),
         *w3 = tg_rand(t, mk, -0.3f, 0.3f, hk), *dy = tg_rand(t, nm, -1, 1, hk);
    int64_t cnt[6] = {nm, nm, nm, nk, mk, mk};
    void *c[6], *g[6];
    for (int i = 0; i < 6; i++) {
        c[i] = malloc((size_t)(cnt[i] * es));
        g[i] = tg_up(t, NULL, cnt[i] * es);
    }
    void *dx_ = tg_up(t, x, nk * es), *dw1_ = tg_up(t, w1, mk * es), *dw3_ = tg_up(t, w3, mk * es),
         *ddy = tg_up(t, dy, nm * es);
    if (hk) {
        hk->c.swiglu_proj_fwd(&t->s.cctx, x, w1, w3, c[0], c[1], c[2], N, K, M);
        hk->c.swiglu_proj_bwd(&t->s.cctx, dy, x, w1, w3, c[0], c[1], c[3], c[4], c[5], N, K, M);
        hk->g.swiglu_proj_fwd(&t->s.gctx, dx_, dw1_, dw3_, g[0], g[1], g[2], N, K, M);
        hk->g.swiglu_proj_bwd(&t->s.gctx, ddy, dx_, dw1_, dw3_, g[0], g[1], g[3], g[4], g[5], N, K, M);
    } else {
        moek_swiglu_proj_fwd(&t->s.cctx, x, w1, w3, c[0], c[1], c[2], N, K, M);
        moek_swiglu_proj_bwd(&t->s.cctx, dy, x, w1, w3, c[0], c[1], c[3], c[4], c[5], N, K, M);
        t->g.swiglu_proj_fwd(&t->s.gctx, dx_, dw1_, dw3_, g[0], g[1], g[2], N, K, M);
        t->g.swiglu_proj_bwd(&t->s.gctx, ddy, dx_, dw1_, dw3_, g[0], g[1], g[3], g[4], g[5], N, K, M);
    }
    int rc = t->g.device_sync(&t->s.gctx, t->s.err, sizeof t->s.err);
    char name[96];
    snprintf(name, sizeof name, "cuda swiglu_proj%s fwd+bwd %lldx%lldx%lld runs", hk ? hk->ty->suffix : "",
             (long long)N, (long long)K, (long long)M);
    CHECK(name, rc == 0 && t->s.gstatus == 0 && t->s.cstatus == 0, "sync %d (%s) gpu %d cpu %d", rc, t->s.err, t->s.gstatus, t->s.cstatus);
    const char *what[6] = {"gate", "up", "y", "dx", "dw1", "dw3"};
    double tol = hk ? 2e-2 : 1e-4, worst = 0;
    const char *wn = "";
    for (int i = 0; i < 6; i++) {
        double e = tg_cmp(t, g[i], c[i], cnt[i], hk ? hk->ty : NULL);
        if (!(e <= worst))
            worst = e, wn = what[i];
    }
    snprintf(name, sizeof name, "cuda swiglu_proj%s == cpu %lldx%lldx%lld", hk ? hk->ty->suffix : "", (long long)N,
             (long long)K, (long long)M);
    CHECK(name, worst <= tol, "worst %s: %.3g > %.3g", wn, worst, tol);
    printf("# %s: worst relative error %.3g (%s)\n", name, worst, wn);
    for (int i = 0; i < 6; i++)
        free(c[i]), t->g.device_free(&t->s.gctx, g[i]);
    void *dall[4] = {dx_, dw1_, dw3_, ddy};
    for (int i = 0; i < 4; i++)
        t->g.device_free(&t->s.gctx, dall[i]);
    free(x), free(w1), free(w3), free(dy);
}

/* router softmax + top-k: probs, gates and dlogits within 1e-5 (fp32) or
 * 1e-2 (half dlogits), idx equal */
static void tg_router(tg_env *t, int64_t N, int64_t E, int64_t k, const tg_half *hk)
{
    int64_t es = hk ? 2 : 4, ne = N * E, nk = N * k;
    void *lg = tg_rand(t, ne, -3, 3, hk);
    float *dp = tg_rand(t, ne, -1, 1, NULL), *dgt = tg_rand(t, nk, -1, 1, NULL);
    float *p = malloc((size_t)ne * 4), *gt = malloc((size_t)nk * 4);
    int32_t *ix = malloc((size_t)nk * 4);
    void *dl = malloc((size_t)(ne * es));
    void *glg = tg_up(t, lg, ne * es), *gdp = tg_up(t, dp, ne * 4), *gdg = tg_up(t, dgt, nk * 4);
    void *gp = tg_up(t, NULL, ne * 4), *gix = tg_up(t, NULL, nk * 4), *ggt = tg_up(t, NULL, nk * 4),
         *gdl = tg_up(t, NULL, ne * es);
    if (hk) {
        hk->c.softmax_topk_fwd(&t->s.cctx, lg, p, ix, gt, N, E, k, 1);
        hk->c.softmax_topk_bwd(&t->s.cctx, dp, dgt, p, ix, dl, N, E, k, 1);
        hk->g.softmax_topk_fwd(&t->s.gctx, glg, gp, gix, ggt, N, E, k, 1);
        hk->g.softmax_topk_bwd(&t->s.gctx, gdp, gdg, gp, gix, gdl, N, E, k, 1);
    } else {
        moek_softmax_topk_fwd(&t->s.cctx, lg, p, ix, gt, N, E, k, 1);
        moek_softmax_topk_bwd(&t->s.cctx, dp, dgt, p, ix, dl, N, E, k, 1);
        t->g.softmax_topk_fwd(&t->s.gctx, glg, gp, gix, ggt, N, E, k, 1);
        t->g.softmax_topk_bwd(&t->s.gctx, gdp, gdg, gp, gix, gdl, N, E, k, 1);
    }
    int rc = t->g.device_sync(&t->s.gctx, t->s.err, sizeof t->s.err);
    int32_t *hix = tg_down(t, gix, nk * 4);
    double ep = tg_cmp(t, gp, p, ne, NULL), eg = tg_cmp(t, ggt, gt, nk, NULL),
           ed = tg_cmp(t, gdl, dl, ne, hk ? hk->ty : NULL);
    char name[96];
    snprintf(name, sizeof name, "cuda softmax_topk%s == cpu %lldx%lld k %lld", hk ? hk->ty->suffix : "", (long long)N,
             (long long)E, (long long)k);
    CHECK(name, rc == 0 && t->s.gstatus == 0 && memcmp(hix, ix, (size_t)nk * 4) == 0 && ep <= 1e-5 && eg <= 1e-5 &&
          ed <= (hk ? 1e-2 : 1e-5), "sync %d gpu %d idx %s probs %.3g gates %.3g dlogits %.3g", rc, t->s.gstatus,
          memcmp(hix, ix, (size_t)nk * 4) ? "differ" : "equal", ep, eg, ed);
    free(hix), free(lg), free(dp), free(dgt), free(p), free(gt), free(ix), free(dl);
    void *dall[7] = {glg, gdp, gdg, gp, gix, ggt, gdl};
    for (int i = 0; i < 7; i++)
        t->g.device_free(&t->s.gctx, dall[i]);
}

int main(void)
{
    void *lib = ch_open("cuda_fused_kernels");
    if (!lib)
        return 0;
    tg_env *t = calloc(1, sizeof *t);
#define TG_SYM(n) CH_ENTRY(t->g, n)
#define TG_SYM_BF16(n) CH_HENTRY(t->halves[CH_BF16].g, n, "_bf16")
#define TG_SYM_F16(n) CH_HENTRY(t->halves[CH_F16].g, n, "_f16")
    ch_sym syms[] = {TG_SYMS(TG_SYM) TG_HALF(TG_SYM_BF16) TG_HALF(TG_SYM_F16)};
#undef TG_SYM
#undef TG_SYM_BF16
#undef TG_SYM_F16
    int go = ch_start(lib, "cuda_fused_kernels", syms, CH_NSYMS(syms), &t->s);
    if (go <= 0) {
        free(t);
        return go < 0;
    }
    t->s.cctx.workspace_bytes = MOEK_BF16_WORKSPACE_BYTES(8 << 20);
    t->s.cctx.workspace = malloc((size_t)t->s.cctx.workspace_bytes);
    t->rng = 0x9e3779b97f4a7c15ull;
    tg_half *bf = &t->halves[CH_BF16], *hf = &t->halves[CH_F16];
#define TG_CPU_BF16(n) bf->c.n = moek_##n##_bf16;
#define TG_CPU_F16(n) hf->c.n = moek_##n##_f16;
    TG_HALF(TG_CPU_BF16)
    TG_HALF(TG_CPU_F16)
#undef TG_CPU_BF16
#undef TG_CPU_F16
    bf->ty = ch_half_type(CH_BF16);
    hf->ty = ch_half_type(CH_F16);
    /* fp32, bf16, fp16 in that order: the fp32 and bf16 cases draw the
     * inputs they drew before fp16 was tested */
    tg_half *types[] = {NULL, bf, hf};
    for (int i = 0; i < 3; i++) {
        tg_case(t, 5, 33, types[i]);
        tg_case(t, 1024, 768, types[i]);
        tg_proj(t, 3, 5, 7, types[i]);
        tg_proj(t, 64, 48, 96, types[i]);   /* workspace 2NM + NK floats: within the harness's 1 MiB */
        tg_router(t, 7, 4, 2, types[i]);
        tg_router(t, 512, 8, 2, types[i]);
    }
    free(t->s.cctx.workspace);
    t->g.device_fini(&t->s.gctx);
    free(t);
    CHECK_DONE();
}
