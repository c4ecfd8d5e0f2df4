/* test_kernels_cuda_stdlib2.c - the issue-2 stdlib kernels of the CUDA
 * library (kernels/cuda/layer_ops.cu: layernorm, silu, repeat_kv, bias_add,
 * fp32 and bf16) against their CPU twins (kernels/cpu/layer_ops.c, linked
 * in).
 *
 * As test_kernels_cuda_routing.c: the CUDA library is dlopened from
 * $MOEC_BUILD/libmoek_cuda.so (default build/), so this program links no
 * CUDA; without the library or a GPU it prints one SKIP line.  Every case
 * runs both sides on the same inputs and requires ||gpu - cpu|| / ||cpu||
 * <= 1e-5 for fp32 outputs and <= 1e-2 for bf16 ones (both sides round
 * nearly equal fp32 results, so a value may sit one bf16 ulp apart);
 * repeat_kv's forward moves values, so it must be bit-exact. */
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
    X(bias_add_fwd) X(bias_add_bwd) X(layernorm_fwd_bf16) X(layernorm_bwd_bf16)                \
    X(silu_fwd_bf16) X(silu_bwd_bf16) X(repeat_kv_fwd_bf16) X(repeat_kv_bwd_bf16)              \
    X(bias_add_fwd_bf16) X(bias_add_bwd_bf16) X(device_count) X(device_init) X(device_fini)    \
    X(device_alloc) X(device_free) X(device_copy) X(device_sync)

typedef struct {
#define S2_FIELD(n) __typeof__(&moek_##n) n;
    S2_KERNELS(S2_FIELD)
#undef S2_FIELD
} s2_lib;

#define S2_MAXBUF 64
#define TOL32 1e-5
#define TOL16 1e-2

typedef struct {
    s2_lib g;
    moek_ctx gctx, cctx;
    int gstatus, cstatus;
    uint64_t rng;
    void *dev[S2_MAXBUF], *host[S2_MAXBUF];
    int ndev, nhost;
    char err[256];
    double worst32, worst16;
} s2_env;

/* a tensor on both sides: fp32 (es 4) or bf16 (es 2) storage */
typedef struct { void *h, *d; int64_t n; int es; } s2_t;

static void s2_die(const char *what, const char *why)
{
    fprintf(stderr, "test_kernels_cuda_stdlib2: %s: %s\n", what, why);
    exit(2);
}

static void *s2_h(s2_env *t, int64_t bytes)
{
    void *p = calloc(1, (size_t)(bytes > 0 ? bytes : 1));
    if (!p || t->nhost >= S2_MAXBUF)
        s2_die("host buffers", "exhausted");
    return t->host[t->nhost++] = p;
}

static void *s2_d(s2_env *t, int64_t bytes)
{
    void *p = t->g.device_alloc(&t->gctx, bytes > 0 ? bytes : 4, t->err, sizeof t->err);
    if (!p || t->ndev >= S2_MAXBUF)
        s2_die("device allocation", t->err);
    return t->dev[t->ndev++] = p;
}

static void s2_copy(s2_env *t, void *dst, const void *src, int64_t bytes, int kind)
{
    if (bytes > 0 && t->g.device_copy(&t->gctx, dst, src, bytes, kind, t->err, sizeof t->err))
        s2_die("copy", t->err);
}

static void s2_reset(s2_env *t)
{
    for (int i = 0; i < t->ndev; i++)
        t->g.device_free(&t->gctx, t->dev[i]);
    for (int i = 0; i < t->nhost; i++)
        free(t->host[i]);
    t->ndev = t->nhost = 0;
    t->gstatus = t->cstatus = 0;
}

static moek_bf16 s2_round(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (moek_bf16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (moek_bf16)(u >> 16);
}

static float s2_widen(moek_bf16 h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static float s2_get(s2_t b, const void *p, int64_t i)
{
    return b.es == 4 ? ((const float *)p)[i] : s2_widen(((const moek_bf16 *)p)[i]);
}

/* random input in [lo, hi) (bf16: rounded) */
static s2_t s2_in(s2_env *t, int es, int64_t n, float lo, float hi)
{
    s2_t b = {s2_h(t, n * es), s2_d(t, n * es), n, es};
    for (int64_t i = 0; i < n; i++) {
        float v = ch_unif(&t->rng, lo, hi);
        if (es == 4)
            ((float *)b.h)[i] = v;
        else
            ((moek_bf16 *)b.h)[i] = s2_round(v);
    }
    s2_copy(t, b.d, b.h, n * es, MOEK_COPY_H2D);
    return b;
}

/* an output poisoned with NaN on both sides, so an unwritten value shows */
static s2_t s2_out(s2_env *t, int es, int64_t n)
{
    s2_t b = {s2_h(t, n * es), s2_d(t, n * es), n, es};
    for (int64_t i = 0; i < n; i++) {
        if (es == 4)
            ((float *)b.h)[i] = NAN;
        else
            ((moek_bf16 *)b.h)[i] = 0x7fc0;
    }
    s2_copy(t, b.d, b.h, n * es, MOEK_COPY_H2D);
    return b;
}

static int s2_sync(s2_env *t, const char *name)
{
    int rc = t->g.device_sync(&t->gctx, t->err, sizeof t->err);
    if (rc || t->gstatus || t->cstatus) {
        CHECK(name, 0, "sync rc %d (%s), gpu status %d, cpu status %d", rc, rc ? t->err : "",
              t->gstatus, t->cstatus);
        return 0;
    }
    return 1;
}

/* tol 0: bit-exact */
static void s2_cmp(s2_env *t, const char *name, s2_t b, double tol)
{
    void *g = s2_h(t, b.n * b.es);
    s2_copy(t, g, b.d, b.n * b.es, MOEK_COPY_D2H);
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
    double *worst = b.es == 4 ? &t->worst32 : &t->worst16;
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
#define G (&t->gctx)
#define C (&t->cctx)

static void s2_layernorm(s2_env *t)
{
    static const int64_t shp[][2] = {{1, 1}, {7, 33}, {300, 64}, {64, 1000}};
    char name[160];
    for (int es = 4; es >= 2; es -= 2)
        for (size_t s = 0; s < sizeof shp / sizeof *shp; s++) {
            int64_t N = shp[s][0], D = shp[s][1];
            const char *ty = es == 4 ? "fp32" : "bf16";
            double tol = es == 4 ? TOL32 : TOL16;
            s2_t x = s2_in(t, es, N * D, -2, 3), w = s2_in(t, es, D, 0.5f, 1.5f), b = s2_in(t, es, D, -1, 1);
            s2_t y = s2_out(t, es, N * D), mean = s2_out(t, 4, N), rstd = s2_out(t, 4, N);
            s2_t dy = s2_in(t, es, N * D, -1, 1), dx = s2_out(t, es, N * D), dw = s2_out(t, es, D),
                 db = s2_out(t, es, D);
            if (es == 4) {
                moek_layernorm_fwd(C, x.h, w.h, b.h, y.h, mean.h, rstd.h, N, D, 1e-5f);
                t->g.layernorm_fwd(G, x.d, w.d, b.d, y.d, mean.d, rstd.d, N, D, 1e-5f);
            } else {
                moek_layernorm_fwd_bf16(C, x.h, w.h, b.h, y.h, mean.h, rstd.h, N, D, 1e-5f);
                t->g.layernorm_fwd_bf16(G, x.d, w.d, b.d, y.d, mean.d, rstd.d, N, D, 1e-5f);
            }
            if (s2_sync(t, NM("cuda layernorm_fwd %s N=%lld D=%lld", ty, (long long)N, (long long)D))) {
                s2_cmp(t, NM("cuda layernorm_fwd %s y N=%lld D=%lld", ty, (long long)N, (long long)D), y, tol);
                s2_cmp(t, NM("cuda layernorm_fwd %s mean N=%lld D=%lld", ty, (long long)N, (long long)D), mean,
                       TOL32);
                s2_cmp(t, NM("cuda layernorm_fwd %s rstd N=%lld D=%lld", ty, (long long)N, (long long)D), rstd,
                       TOL32);
            }
            /* both backwards read the CPU's statistics */
            s2_copy(t, mean.d, mean.h, N * 4, MOEK_COPY_H2D);
            s2_copy(t, rstd.d, rstd.h, N * 4, MOEK_COPY_H2D);
            if (es == 4) {
                moek_layernorm_bwd(C, dy.h, x.h, w.h, mean.h, rstd.h, dx.h, dw.h, db.h, N, D);
                t->g.layernorm_bwd(G, dy.d, x.d, w.d, mean.d, rstd.d, dx.d, dw.d, db.d, N, D);
            } else {
                moek_layernorm_bwd_bf16(C, dy.h, x.h, w.h, mean.h, rstd.h, dx.h, dw.h, db.h, N, D);
                t->g.layernorm_bwd_bf16(G, dy.d, x.d, w.d, mean.d, rstd.d, dx.d, dw.d, db.d, N, D);
            }
            if (s2_sync(t, NM("cuda layernorm_bwd %s N=%lld D=%lld", ty, (long long)N, (long long)D))) {
                s2_cmp(t, NM("cuda layernorm_bwd %s dx N=%lld D=%lld", ty, (long long)N, (long long)D), dx, tol);
                s2_cmp(t, NM("cuda layernorm_bwd %s dw N=%lld D=%lld", ty, (long long)N, (long long)D), dw, tol);
                s2_cmp(t, NM("cuda layernorm_bwd %s db N=%lld D=%lld", ty, (long long)N, (long long)D), db, tol);
            }
            s2_reset(t);
        }
}

static void s2_elementwise(s2_env *t)
{
    static const int64_t shp[][2] = {{1, 1}, {13, 7}, {512, 96}, {33, 3000}};
    char name[160];
    for (int es = 4; es >= 2; es -= 2)
        for (size_t s = 0; s < sizeof shp / sizeof *shp; s++) {
            int64_t N = shp[s][0], D = shp[s][1], n = N * D;
            const char *ty = es == 4 ? "fp32" : "bf16";
            double tol = es == 4 ? TOL32 : TOL16;
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
                moek_silu_fwd_bf16(C, x.h, y.h, n);
                t->g.silu_fwd_bf16(G, x.d, y.d, n);
                moek_silu_bwd_bf16(C, dy.h, x.h, dx.h, n);
                t->g.silu_bwd_bf16(G, dy.d, x.d, dx.d, n);
                moek_bias_add_fwd_bf16(C, x.h, b.h, y2.h, N, D);
                t->g.bias_add_fwd_bf16(G, x.d, b.d, y2.d, N, D);
                moek_bias_add_bwd_bf16(C, dy.h, dx2.h, db.h, N, D);
                t->g.bias_add_bwd_bf16(G, dy.d, dx2.d, db.d, N, D);
            }
            if (s2_sync(t, NM("cuda silu/bias_add %s N=%lld D=%lld", ty, (long long)N, (long long)D))) {
                s2_cmp(t, NM("cuda silu_fwd %s n=%lld", ty, (long long)n), y, tol);
                s2_cmp(t, NM("cuda silu_bwd %s n=%lld", ty, (long long)n), dx, tol);
                s2_cmp(t, NM("cuda bias_add_fwd %s N=%lld D=%lld", ty, (long long)N, (long long)D), y2, tol);
                s2_cmp(t, NM("cuda bias_add_bwd %s dx N=%lld D=%lld", ty, (long long)N, (long long)D), dx2, 0);
                s2_cmp(t, NM("cuda bias_add_bwd %s db N=%lld D=%lld", ty, (long long)N, (long long)D), db, tol);
            }
            s2_reset(t);
        }
}

static void s2_repeat_kv(s2_env *t)
{
    static const int64_t shp[][4] = {{1, 1, 1, 1}, {10, 2, 4, 8}, {256, 2, 8, 64}, {64, 4, 4, 16}};
    char name[160];
    for (int es = 4; es >= 2; es -= 2)
        for (size_t s = 0; s < sizeof shp / sizeof *shp; s++) {
            int64_t N = shp[s][0], Hkv = shp[s][1], H = shp[s][2], Dh = shp[s][3];
            const char *ty = es == 4 ? "fp32" : "bf16";
            s2_t x = s2_in(t, es, N * Hkv * Dh, -1, 1), y = s2_out(t, es, N * H * Dh);
            s2_t dy = s2_in(t, es, N * H * Dh, -1, 1), dx = s2_out(t, es, N * Hkv * Dh);
            if (es == 4) {
                moek_repeat_kv_fwd(C, x.h, y.h, N, Hkv, H, Dh);
                t->g.repeat_kv_fwd(G, x.d, y.d, N, Hkv, H, Dh);
                moek_repeat_kv_bwd(C, dy.h, dx.h, N, Hkv, H, Dh);
                t->g.repeat_kv_bwd(G, dy.d, dx.d, N, Hkv, H, Dh);
            } else {
                moek_repeat_kv_fwd_bf16(C, x.h, y.h, N, Hkv, H, Dh);
                t->g.repeat_kv_fwd_bf16(G, x.d, y.d, N, Hkv, H, Dh);
                moek_repeat_kv_bwd_bf16(C, dy.h, dx.h, N, Hkv, H, Dh);
                t->g.repeat_kv_bwd_bf16(G, dy.d, dx.d, N, Hkv, H, Dh);
            }
            if (s2_sync(t, NM("cuda repeat_kv %s N=%lld Hkv=%lld H=%lld", ty, (long long)N, (long long)Hkv,
                              (long long)H))) {
                s2_cmp(t, NM("cuda repeat_kv_fwd %s N=%lld Hkv=%lld H=%lld (bit-exact)", ty, (long long)N,
                             (long long)Hkv, (long long)H), y, 0);
                /* same fp32 sums in the same order: bit-exact too */
                s2_cmp(t, NM("cuda repeat_kv_bwd %s N=%lld Hkv=%lld H=%lld (bit-exact)", ty, (long long)N,
                             (long long)Hkv, (long long)H), dx, 0);
            }
            s2_reset(t);
        }
    /* a bad head split: MOEK_E_SHAPE on the host, nothing launched */
    int st = 0;
    moek_ctx g = t->gctx;
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
    ch_sym syms[] = {S2_KERNELS(S2_SYM)};
#undef S2_SYM
    int go = ch_start(lib, "cuda_stdlib2_kernels", syms, CH_NSYMS(syms), &t->gctx, t->err, sizeof t->err);
    if (go < 0)
        return 1;
    if (go == 0) {
        free(t);
        dlclose(lib);
        return 0;
    }
    /* the CPU bf16 variants widen into a workspace */
    int64_t wsb = MOEK_BF16_WORKSPACE_BYTES(4 * 300 * 1000);
    t->cctx.workspace = malloc((size_t)wsb);
    t->cctx.workspace_bytes = wsb;
    t->gctx.status = &t->gstatus;
    t->cctx.status = &t->cstatus;
    t->rng = 0x9b05688c2b3e6c1full;
    s2_layernorm(t);
    s2_elementwise(t);
    s2_repeat_kv(t);
    t->g.device_fini(&t->gctx);
    printf("# worst relative error: fp32 %.3g, bf16 %.3g\n", t->worst32, t->worst16);
    free(t->cctx.workspace);
    free(t);
    CHECK_DONE();
}
