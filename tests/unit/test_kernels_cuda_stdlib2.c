/* test_kernels_cuda_stdlib2.c - the issue-2 stdlib kernels of the CUDA
 * library (kernels/cuda/layer_ops.cu: layernorm, silu, repeat_kv, bias_add,
 * fp32, bf16 and fp16) against their CPU twins (kernels/cpu/layer_ops.c and
 * f16.c, linked in).
 *
 * As test_kernels_cuda_routing.c: the CUDA library is dlopened from
 * $MOEC_BUILD/libmoek_cuda.so (default build/), so this program links no
 * CUDA; without the library or a GPU it prints one SKIP line.  Every case
 * runs both sides on the same inputs and requires ||gpu - cpu|| / ||cpu||
 * <= 1e-5 for fp32 outputs and <= 1e-2 for bf16 and fp16 ones (both sides
 * round nearly equal fp32 results, so a value may sit one ulp apart);
 * repeat_kv's forward moves values, so it must be bit-exact.  One body per
 * kernel family runs each type (s2_half); fp16 runs last, on the bf16
 * cases' input ranges (|x| <= 8, far inside fp16's 65504). */
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../kernels/moek.h"
#include "check.h"
#include "cuda_harness.h"

#define S2_KERNELS(X)                                                                          \
    X(layernorm_fwd) X(layernorm_bwd) X(silu_fwd) X(silu_bwd) X(repeat_kv_fwd) X(repeat_kv_bwd) \
    X(bias_add_fwd) X(bias_add_bwd) X(device_count) X(device_init) X(device_fini)              \
    X(device_alloc) X(device_free) X(device_copy) X(device_sync)

/* the half variants, by their names without the _bf16 / _f16 suffix */
#define S2_HALF(X)                                                                             \
    X(layernorm_fwd) X(layernorm_bwd) X(silu_fwd) X(silu_bwd) X(repeat_kv_fwd) X(repeat_kv_bwd) \
    X(bias_add_fwd) X(bias_add_bwd)

typedef struct {
#define S2_FIELD(n) __typeof__(&moek_##n) n;
    S2_KERNELS(S2_FIELD)
#undef S2_FIELD
} s2_lib;

/* one library's half variants, typed as the _bf16 ones (cuda_harness.h) */
typedef struct {
#define S2_HFIELD(n) __typeof__(&moek_##n##_bf16) n;
    S2_HALF(S2_HFIELD)
#undef S2_HFIELD
} s2_hlib;

/* a half type: its descriptor, its variants in the CPU and CUDA libraries
 * and the largest relative error of its half outputs */
typedef struct {
    const ch_half *ty;
    s2_hlib c, g;
    double worst;
} s2_half;

#define TOL32 1e-5
#define TOL16 1e-2

typedef struct {
    s2_lib g;
    ch_side s;          /* contexts, statuses, this case's buffers */
    uint64_t rng;
    double worst32;
    s2_half halves[CH_NHALF];
    s2_half *half;      /* the half type of the running cases (es 2), NULL in fp32 */
} s2_env;

/* a tensor on both sides: fp32 (es 4, ty NULL) or half (es 2, of type ty) */
typedef struct { void *h, *d; int64_t n; int es; const ch_half *ty; } s2_t;

static float s2_get(s2_t b, const void *p, int64_t i)
{
    return b.es == 4 ? ((const float *)p)[i] : b.ty->widen(((const uint16_t *)p)[i]);
}

/* random input in [lo, hi) (es 2: rounded to t->half's type) */
static s2_t s2_in(s2_env *t, int es, int64_t n, float lo, float hi)
{
    s2_t b = {ch_host(&t->s, n * es), ch_dev(&t->s, n * es), n, es, es == 4 ? NULL : t->half->ty};
    for (int64_t i = 0; i < n; i++) {
        float v = ch_unif(&t->rng, lo, hi);
        if (es == 4)
            ((float *)b.h)[i] = v;
        else
            ((uint16_t *)b.h)[i] = b.ty->round(v);
    }
    ch_copy(&t->s, b.d, b.h, n * es, MOEK_COPY_H2D);
    return b;
}

/* an output poisoned with NaN on both sides, so an unwritten value shows */
static s2_t s2_out(s2_env *t, int es, int64_t n)
{
    s2_t b = {ch_host(&t->s, n * es), ch_dev(&t->s, n * es), n, es, es == 4 ? NULL : t->half->ty};
    for (int64_t i = 0; i < n; i++) {
        if (es == 4)
            ((float *)b.h)[i] = NAN;
        else
            ((uint16_t *)b.h)[i] = b.ty->nan;
    }
    ch_copy(&t->s, b.d, b.h, n * es, MOEK_COPY_H2D);
    return b;
}

/* tol 0: bit-exact */
static void s2_cmp(s2_env *t, const char *name, s2_t b, double tol)
{
    void *g = ch_host(&t->s, b.n * b.es);
    ch_copy(&t->s, g, b.d, b.n * b.es, MOEK_COPY_D2H);
    double num = 0.0, den = 0.0;
    int64_t bad = -1;
    for (int64_t i = 0; i < b.n; i++) {
        float c = s2_get(b, b.h, i), v = s2_get(b, g, i);
        if ((!isfinite(c) || !isfinite(v)) && bad < 0)
            bad = i;
        num += ((double)v - c) * ((double)v - c);
        den += (double)c * c;
    }
    double rel = den > 0 ? sqrt(num / den) : sqrt(num);
    double *worst = b.es == 4 ? &t->worst32 : &t->half->worst;
    if (isfinite(rel) && rel > *worst)
        *worst = rel;
    if (bad >= 0)
        CHECK(name, 0, "gpu[%lld] = %g, cpu %g", (long long)bad, s2_get(b, g, bad), s2_get(b, b.h, bad));
    else if (tol == 0)
        CHECK(name, memcmp(g, b.h, (size_t)(b.n * b.es)) == 0, "not bit-exact (relative error %.3g)", rel);
    else
        CHECK(name, rel <= tol, "relative error %.3g > %.1g over %lld values", rel, tol, (long long)b.n);
}

#define NM(...) (snprintf(name, sizeof name, __VA_ARGS__), name)
#define G (&t->s.gctx)
#define C (&t->s.cctx)

/* each case of a family runs in one type: fp32 (hk NULL) or the half type hk */
static void s2_layernorm(s2_env *t, s2_half *hk)
{
    static const int64_t shp[][2] = {{1, 1}, {7, 33}, {300, 64}, {64, 1000}};
    char name[160];
    int es = hk ? 2 : 4;
    const char *ty = hk ? hk->ty->name : "fp32";
    double tol = hk ? TOL16 : TOL32;
    t->half = hk;
    for (size_t s = 0; s < sizeof shp / sizeof *shp; s++) {
        int64_t N = shp[s][0], D = shp[s][1];
        s2_t x = s2_in(t, es, N * D, -2, 3), w = s2_in(t, es, D, 0.5f, 1.5f), b = s2_in(t, es, D, -1, 1);
        s2_t y = s2_out(t, es, N * D), mean = s2_out(t, 4, N), rstd = s2_out(t, 4, N);
        s2_t dy = s2_in(t, es, N * D, -1, 1), dx = s2_out(t, es, N * D), dw = s2_out(t, es, D),
             db = s2_out(t, es, D);
        if (es == 4) {
            moek_layernorm_fwd(C, x.h, w.h, b.h, y.h, mean.h, rstd.h, N, D, 1e-5f);
            t->g.layernorm_fwd(G, x.d, w.d, b.d, y.d, mean.d, rstd.d, N, D, 1e-5f);
        } else {
            hk->c.layernorm_fwd(C, x.h, w.h, b.h, y.h, mean.h, rstd.h, N, D, 1e-5f);
            hk->g.layernorm_fwd(G, x.d, w.d, b.d, y.d, mean.d, rstd.d, N, D, 1e-5f);
        }
        if (ch_sync(&t->s, NM("cuda layernorm_fwd %s N=%lld D=%lld", ty, (long long)N, (long long)D))) {
            s2_cmp(t, NM("cuda layernorm_fwd %s y N=%lld D=%lld", ty, (long long)N, (long long)D), y, tol);
            s2_cmp(t, NM("cuda layernorm_fwd %s mean N=%lld D=%lld", ty, (long long)N, (long long)D), mean,
                   TOL32);
            s2_cmp(t, NM("cuda layernorm_fwd %s rstd N=%lld D=%lld", ty, (long long)N, (long long)D), rstd,
                   TOL32);
        }
        /* both backwards read the CPU's statistics */
        ch_copy(&t->s, mean.d, mean.h, N * 4, MOEK_COPY_H2D);
        ch_copy(&t->s, rstd.d, rstd.h, N * 4, MOEK_COPY_H2D);
        if (es == 4) {
            moek_layernorm_bwd(C, dy.h, x.h, w.h, mean.h, rstd.h, dx.h, dw.h, db.h, N, D);
            t->g.layernorm_bwd(G, dy.d, x.d, w.d, mean.d, rstd.d, dx.d, dw.d, db.d, N, D);
        } else {
            hk->c.layernorm_bwd(C, dy.h, x.h, w.h, mean.h, rstd.h, dx.h, dw.h, db.h, N, D);
            hk->g.layernorm_bwd(G, dy.d, x.d, w.d, mean.d, rstd.d, dx.d, dw.d, db.d, N, D);
        }
        if (ch_sync(&t->s, NM("cuda layernorm_bwd %s N=%lld D=%lld", ty, (long long)N, (long long)D))) {
            s2_cmp(t, NM("cuda layernorm_bwd %s dx N=%lld D=%lld", ty, (long long)N, (long long)D), dx, tol);
            s2_cmp(t, NM("cuda layernorm_bwd %s dw N=%lld D=%lld", ty, (long long)N, (long long)D), dw, tol);
            s2_cmp(t, NM("cuda layernorm_bwd %s db N=%lld D=%lld", ty, (long long)N, (long long)D), db, tol);
        }
        ch_end_case(&t->s);
    }
    t->half = NULL;
}

static void s2_elementwise(s2_env *t, s2_half *hk)
{
    static const int64_t shp[][2] = {{1, 1}, {13, 7}, {512, 96}, {33, 3000}};
    char name[160];
    int es = hk ? 2 : 4;
    const char *ty = hk ? hk->ty->name : "fp32";
    double tol = hk ? TOL16 : TOL32;
    t->half = hk;
    for (size_t s = 0; s < sizeof shp / sizeof *shp; s++) {
        int64_t N = shp[s][0], D = shp[s][1], n = N * D;
        s2_t x = s2_in(t, es, n, -8, 8), dy = s2_in(t, es, n, -1, 1), b = s2_in(t, es, D, -1, 1);
        s2_t y = s2_out(t, es, n), dx = s2_out(t, es, n), y2 = s2_out(t, es, n), dx2 = s2_out(t, es, n),
             db = s2_out(t, es, D);
        if (es == 4) {
            moek_silu_fwd(C, x.h, y.h, n);
            t->g.silu_fwd(G, x.d, y.d, n);
            moek_silu_bwd(C, dy.h, x.h, dx.h, n);
            t->g.silu_bwd(G, dy.d, x.d, dx.d, n);
            moek_bias_add_fwd(C, x.h, b.h, y2.h, N, D);
            t->g.bias_add_fwd(G, x.d, b.d, y2.d, N, D);
            moek_bias_add_bwd(C, dy.h, dx2.h, db.h, N, D);
            t->g.bias_add_bwd(G, dy.d, dx2.d, db.d, N, D);
        } else {
            hk->c.silu_fwd(C, x.h, y.h, n);
            hk->g.silu_fwd(G, x.d, y.d, n);
            hk->c.silu_bwd(C, dy.h, x.h, dx.h, n);
            hk->g.silu_bwd(G, dy.d, x.d, dx.d, n);
            hk->c.bias_add_fwd(C, x.h, b.h, y2.h, N, D);
            hk->g.bias_add_fwd(G, x.d, b.d, y2.d, N, D);
            hk->c.bias_add_bwd(C, dy.h, dx2.h, db.h, N, D);
            hk->g.bias_add_bwd(G, dy.d, dx2.d, db.d, N, D);
        }
        if (ch_sync(&t->s, NM("cuda silu/bias_add %s N=%lld D=%lld", ty, (long long)N, (long long)D))) {
            s2_cmp(t, NM("cuda silu_fwd %s n=%lld", ty, (long long)n), y, tol);
            s2_cmp(t, NM("cuda silu_bwd %s n=%lld", ty, (long long)n), dx, tol);
            s2_cmp(t, NM("cuda bias_add_fwd %s N=%lld D=%lld", ty, (long long)N, (long long)D), y2, tol);
            s2_cmp(t, NM("cuda bias_add_bwd %s dx N=%lld D=%lld", ty, (long long)N, (long long)D), dx2, 0);
            s2_cmp(t, NM("cuda bias_add_bwd %s db N=%lld D=%lld", ty, (long long)N, (long long)D), db, tol);
        }
        ch_end_case(&t->s);
    }
    t->half = NULL;
}

static void s2_repeat_kv(s2_env *t, s2_half *hk)
{
    static const int64_t shp[][4] = {{1, 1, 1, 1}, {10, 2, 4, 8}, {256, 2, 8, 64}, {64, 4, 4, 16}};
    char name[160];
    int es = hk ? 2 : 4;
    const char *ty = hk ? hk->ty->name : "fp32";
    t->half = hk;
    for (size_t s = 0; s < sizeof shp / sizeof *shp; s++) {
        int64_t N = shp[s][0], Hkv = shp[s][1], H = shp[s][2], Dh = shp[s][3];
        s2_t x = s2_in(t, es, N * Hkv * Dh, -1, 1), y = s2_out(t, es, N * H * Dh);
        s2_t dy = s2_in(t, es, N * H * Dh, -1, 1), dx = s2_out(t, es, N * Hkv * Dh);
        if (es == 4) {
            moek_repeat_kv_fwd(C, x.h, y.h, N, Hkv, H, Dh);
            t->g.repeat_kv_fwd(G, x.d, y.d, N, Hkv, H, Dh);
            moek_repeat_kv_bwd(C, dy.h, dx.h, N, Hkv, H, Dh);
            t->g.repeat_kv_bwd(G, dy.d, dx.d, N, Hkv, H, Dh);
        } else {
            hk->c.repeat_kv_fwd(C, x.h, y.h, N, Hkv, H, Dh);
            hk->g.repeat_kv_fwd(G, x.d, y.d, N, Hkv, H, Dh);
            hk->c.repeat_kv_bwd(C, dy.h, dx.h, N, Hkv, H, Dh);
            hk->g.repeat_kv_bwd(G, dy.d, dx.d, N, Hkv, H, Dh);
        }
        if (ch_sync(&t->s, NM("cuda repeat_kv %s N=%lld Hkv=%lld H=%lld", ty, (long long)N, (long long)Hkv,
                          (long long)H))) {
            s2_cmp(t, NM("cuda repeat_kv_fwd %s N=%lld Hkv=%lld H=%lld (bit-exact)", ty, (long long)N,
                         (long long)Hkv, (long long)H), y, 0);
            /* same fp32 sums in the same order: bit-exact too */
            s2_cmp(t, NM("cuda repeat_kv_bwd %s N=%lld Hkv=%lld H=%lld (bit-exact)", ty, (long long)N,
                         (long long)Hkv, (long long)H), dx, 0);
        }
        ch_end_case(&t->s);
    }
    t->half = NULL;
}

/* a bad head split: MOEK_E_SHAPE on the host, nothing launched */
static void s2_bad_split(s2_env *t)
{
    int st = 0;
    moek_ctx g = t->s.gctx;
    g.status = &st;
    t->g.repeat_kv_fwd(&g, NULL, NULL, 4, 3, 8, 16);
    CHECK("cuda repeat_kv_fwd: H % Hkv != 0 is MOEK_E_SHAPE", st == MOEK_E_SHAPE, "status %d", st);
}

int main(void)
{
    void *lib = ch_open("cuda_stdlib2_kernels");
    if (!lib)
        return 0;
    s2_env *t = calloc(1, sizeof *t);
    if (!t)
        return 2;
#define S2_SYM(n) CH_ENTRY(t->g, n)
#define S2_SYM_BF16(n) CH_HENTRY(t->halves[CH_BF16].g, n, "_bf16")
#define S2_SYM_F16(n) CH_HENTRY(t->halves[CH_F16].g, n, "_f16")
    ch_sym syms[] = {S2_KERNELS(S2_SYM) S2_HALF(S2_SYM_BF16) S2_HALF(S2_SYM_F16)};
#undef S2_SYM
#undef S2_SYM_BF16
#undef S2_SYM_F16
    int go = ch_start(lib, "cuda_stdlib2_kernels", syms, CH_NSYMS(syms), &t->s);
    if (go <= 0) {
        free(t);
        return go < 0;
    }
    /* the CPU half variants widen into a workspace (the bf16 macro serves fp16) */
    int64_t wsb = MOEK_BF16_WORKSPACE_BYTES(4 * 300 * 1000);
    t->s.cctx.workspace = malloc((size_t)wsb);
    t->s.cctx.workspace_bytes = wsb;
    t->rng = 0x9b05688c2b3e6c1full;
    s2_half *bf = &t->halves[CH_BF16], *hf = &t->halves[CH_F16];
#define S2_CPU_BF16(n) bf->c.n = moek_##n##_bf16;
#define S2_CPU_F16(n) hf->c.n = moek_##n##_f16;
    S2_HALF(S2_CPU_BF16)
    S2_HALF(S2_CPU_F16)
#undef S2_CPU_BF16
#undef S2_CPU_F16
    bf->ty = ch_half_type(CH_BF16);
    hf->ty = ch_half_type(CH_F16);
    /* fp32 and bf16 in the order they always ran, fp16 after them all, so
     * the fp32 and bf16 cases draw the inputs they drew before */
    s2_layernorm(t, NULL);
    s2_layernorm(t, bf);
    s2_elementwise(t, NULL);
    s2_elementwise(t, bf);
    s2_repeat_kv(t, NULL);
    s2_repeat_kv(t, bf);
    s2_bad_split(t);
    s2_layernorm(t, hf);
    s2_elementwise(t, hf);
    s2_repeat_kv(t, hf);
    t->g.device_fini(&t->s.gctx);
    printf("# worst relative error: fp32 %.3g, bf16 %.3g, f16 %.3g\n", t->worst32, bf->worst, hf->worst);
    free(t->s.cctx.workspace);
    free(t);
    CHECK_DONE();
}
