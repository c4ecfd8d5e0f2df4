/* test_kernels_cuda_routing.c - the issue-4 routing kernels of the CUDA
 * library (kernels/cuda/routing.cu) against their CPU twins
 * (kernels/cpu/routing.c, linked in).
 *
 * As test_kernels_cuda.c: the CUDA library is dlopened from
 * $MOEC_BUILD/libmoek_cuda.so (default build/), so this program links no
 * CUDA; without the library or a GPU it prints one SKIP line.  Each case
 * draws random inputs (scores quantised so ties happen), poisons the
 * outputs, runs both sides and requires ||gpu - cpu|| / ||cpu|| <= 1e-5
 * for floats and equality for every integer output (expert choices, slot
 * rows) and for the jitter, whose bits are specified. */
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../kernels/moek.h"
#include "check.h"
#include "cuda_harness.h"

#define RC_KERNELS(X)                                                                          \
    X(sigmoid_fwd) X(sigmoid_bwd) X(topk_biased_fwd) X(topk_biased_bwd) X(topk_grouped_fwd)     \
    X(topk_softmax_fwd) X(topk_softmax_bwd) X(jitter_fwd) X(jitter_bwd)                         \
    X(seq_balance_loss_fwd) X(seq_balance_loss_bwd) X(expert_load) X(router_bias_update)        \
    X(dispatch_by_score_fwd) X(device_count) X(device_init) X(device_fini) X(device_alloc)      \
    X(device_free) X(device_copy) X(device_sync)

typedef struct {
#define RC_FIELD(n) __typeof__(&moek_##n) n;
    RC_KERNELS(RC_FIELD)
#undef RC_FIELD
} rc_lib;

#define TOL 1e-5

typedef struct {
    rc_lib g;
    ch_side s;          /* contexts, statuses, this case's buffers */
    uint64_t rng;
    double worst;
    char worst_name[160];
} rc_env;

typedef struct { float *h, *d; int64_t n; } rc_f;
typedef struct { int32_t *h, *d; int64_t n; } rc_i;

/* random input; quant > 0 rounds to multiples of 1/quant so ties happen */
static rc_f rc_in(rc_env *t, int64_t n, float lo, float hi, float quant)
{
    rc_f b = {ch_host(&t->s, n * 4), ch_dev(&t->s, n * 4), n};
    for (int64_t i = 0; i < n; i++) {
        b.h[i] = ch_unif(&t->rng, lo, hi);
        if (quant > 0)
            b.h[i] = roundf(b.h[i] * quant) / quant;
    }
    ch_copy(&t->s, b.d, b.h, n * 4, MOEK_COPY_H2D);
    return b;
}

static rc_f rc_out(rc_env *t, int64_t n)
{
    rc_f b = {ch_host(&t->s, n * 4), ch_dev(&t->s, n * 4), n};
    for (int64_t i = 0; i < n; i++)
        b.h[i] = NAN;
    ch_copy(&t->s, b.d, b.h, n * 4, MOEK_COPY_H2D);
    return b;
}

static rc_i rc_iout(rc_env *t, int64_t n)
{
    rc_i b = {ch_host(&t->s, n * 4), ch_dev(&t->s, n * 4), n};
    for (int64_t i = 0; i < n; i++)
        b.h[i] = -12345;
    ch_copy(&t->s, b.d, b.h, n * 4, MOEK_COPY_H2D);
    return b;
}

static void rc_iup(rc_env *t, rc_i b) { ch_copy(&t->s, b.d, b.h, b.n * 4, MOEK_COPY_H2D); }

static void rc_cmp(rc_env *t, const char *name, rc_f b, double tol)
{
    float *g = ch_host(&t->s, b.n * 4);
    ch_copy(&t->s, g, b.d, b.n * 4, MOEK_COPY_D2H);
    double num = 0.0, den = 0.0;
    int64_t bad = -1;
    for (int64_t i = 0; i < b.n; i++) {
        if (isfinite(b.h[i]) != isfinite(g[i]) && bad < 0)
            bad = i;
        double d = (double)g[i] - b.h[i];
        num += d * d;
        den += (double)b.h[i] * b.h[i];
    }
    double rel = den > 0 ? sqrt(num / den) : sqrt(num);
    if (isfinite(rel) && rel > t->worst) {
        t->worst = rel;
        snprintf(t->worst_name, sizeof t->worst_name, "%s", name);
    }
    if (bad >= 0)
        CHECK(name, 0, "gpu[%lld] = %g (cpu %g)", (long long)bad, g[bad], b.h[bad]);
    else
        CHECK(name, isfinite(rel) && rel <= tol, "relative error %.3g > %.1g over %lld values", rel,
              tol, (long long)b.n);
}

static void rc_icmp(rc_env *t, const char *name, rc_i b)
{
    int32_t *g = ch_host(&t->s, b.n * 4);
    ch_copy(&t->s, g, b.d, b.n * 4, MOEK_COPY_D2H);
    int64_t bad = -1;
    for (int64_t i = 0; i < b.n && bad < 0; i++)
        if (g[i] != b.h[i])
            bad = i;
    CHECK(name, bad < 0, "gpu[%lld] = %d, cpu %d", (long long)bad, bad >= 0 ? g[bad] : 0,
          bad >= 0 ? b.h[bad] : 0);
}

#define NM(...) (snprintf(name, sizeof name, __VA_ARGS__), name)
#define G (&t->s.gctx)
#define C (&t->s.cctx)

static void rc_sigmoid(rc_env *t)
{
    static const int64_t shp[][2] = {{1, 1}, {37, 8}, {1000, 64}, {4096, 256}};
    char name[160];
    for (size_t s = 0; s < sizeof shp / sizeof *shp; s++) {
        int64_t N = shp[s][0], E = shp[s][1];
        rc_f x = rc_in(t, N * E, -8, 8, 0), y = rc_out(t, N * E), dy = rc_in(t, N * E, -1, 1, 0);
        rc_f dx = rc_out(t, N * E);
        moek_sigmoid_fwd(C, x.h, y.h, N, E);
        t->g.sigmoid_fwd(G, x.d, y.d, N, E);
        if (ch_sync(&t->s, NM("cuda sigmoid_fwd N=%lld E=%lld", (long long)N, (long long)E)))
            rc_cmp(t, name, y, TOL);
        moek_sigmoid_bwd(C, dy.h, y.h, dx.h, N, E);
        t->g.sigmoid_bwd(G, dy.d, y.d, dx.d, N, E);
        if (ch_sync(&t->s, NM("cuda sigmoid_bwd N=%lld E=%lld", (long long)N, (long long)E)))
            rc_cmp(t, name, dx, TOL);
        ch_end_case(&t->s);
    }
}

/* biased and grouped selection share the backward */
static void rc_selection(rc_env *t)
{
    /* N, E, k, groups, topk_groups */
    static const int64_t shp[][5] = {{1, 4, 1, 2, 1},   {37, 8, 2, 4, 2},    {500, 16, 4, 4, 2},
                                     {300, 64, 6, 8, 3}, {2000, 256, 8, 8, 4}, {129, 12, 3, 12, 5}};
    char name[200];
    for (size_t s = 0; s < sizeof shp / sizeof *shp; s++) {
        int64_t N = shp[s][0], E = shp[s][1], k = shp[s][2], Gr = shp[s][3], TG = shp[s][4];
        rc_f sc = rc_in(t, N * E, 0, 1, 16), bias = rc_in(t, E, -0.1f, 0.1f, 64);
        rc_f dg = rc_in(t, N * k, -1, 1, 0), ds = rc_out(t, N * E);
        for (int variant = 0; variant < 4; variant++) {
            int grouped = variant >> 1, renorm = variant & 1;
            const float *bh = (variant == 1) ? NULL : bias.h, *bd = (variant == 1) ? NULL : bias.d;
            float scale = renorm ? 2.5f : 1.0f;
            rc_i idx = rc_iout(t, N * k);
            rc_f gates = rc_out(t, N * k);
            const char *what = grouped ? "topk_grouped" : "topk_biased";
            if (grouped) {
                moek_topk_grouped_fwd(C, sc.h, bh, idx.h, gates.h, N, E, k, Gr, TG, renorm, scale);
                t->g.topk_grouped_fwd(G, sc.d, bd, idx.d, gates.d, N, E, k, Gr, TG, renorm, scale);
            } else {
                moek_topk_biased_fwd(C, sc.h, bh, idx.h, gates.h, N, E, k, renorm, scale);
                t->g.topk_biased_fwd(G, sc.d, bd, idx.d, gates.d, N, E, k, renorm, scale);
            }
            if (ch_sync(&t->s, NM("cuda %s_fwd N=%lld E=%lld k=%lld renorm=%d bias=%d", what,
                              (long long)N, (long long)E, (long long)k, renorm, bh != NULL))) {
                rc_icmp(t, NM("cuda %s_fwd idx N=%lld E=%lld k=%lld renorm=%d bias=%d", what,
                              (long long)N, (long long)E, (long long)k, renorm, bh != NULL), idx);
                rc_cmp(t, NM("cuda %s_fwd gates N=%lld E=%lld k=%lld renorm=%d bias=%d", what,
                             (long long)N, (long long)E, (long long)k, renorm, bh != NULL), gates,
                       TOL);
            }
            /* the backward on the CPU's choices, on both sides */
            rc_iup(t, idx);
            moek_topk_biased_bwd(C, dg.h, sc.h, idx.h, ds.h, N, E, k, renorm, scale);
            t->g.topk_biased_bwd(G, dg.d, sc.d, idx.d, ds.d, N, E, k, renorm, scale);
            if (ch_sync(&t->s, NM("cuda topk_biased_bwd (%s) N=%lld E=%lld k=%lld renorm=%d", what,
                              (long long)N, (long long)E, (long long)k, renorm)))
                rc_cmp(t, name, ds, TOL);
        }
        /* top-k then softmax, on logits */
        rc_f lg = rc_in(t, N * E, -4, 4, 8);
        rc_i idx = rc_iout(t, N * k);
        rc_f gates = rc_out(t, N * k), dl = rc_out(t, N * E);
        moek_topk_softmax_fwd(C, lg.h, idx.h, gates.h, N, E, k);
        t->g.topk_softmax_fwd(G, lg.d, idx.d, gates.d, N, E, k);
        if (ch_sync(&t->s, NM("cuda topk_softmax_fwd N=%lld E=%lld k=%lld", (long long)N, (long long)E,
                          (long long)k))) {
            rc_icmp(t, NM("cuda topk_softmax_fwd idx N=%lld E=%lld k=%lld", (long long)N,
                          (long long)E, (long long)k), idx);
            rc_cmp(t, NM("cuda topk_softmax_fwd gates N=%lld E=%lld k=%lld", (long long)N,
                         (long long)E, (long long)k), gates, TOL);
        }
        rc_iup(t, idx);
        ch_copy(&t->s, gates.d, gates.h, N * k * 4, MOEK_COPY_H2D);
        moek_topk_softmax_bwd(C, dg.h, gates.h, idx.h, dl.h, N, E, k);
        t->g.topk_softmax_bwd(G, dg.d, gates.d, idx.d, dl.d, N, E, k);
        if (ch_sync(&t->s, NM("cuda topk_softmax_bwd N=%lld E=%lld k=%lld", (long long)N, (long long)E,
                          (long long)k)))
            rc_cmp(t, name, dl, TOL);
        ch_end_case(&t->s);
    }
}

static void rc_jitter(rc_env *t)
{
    static const int64_t sizes[] = {1, 1000, 300001};
    char name[160];
    for (size_t s = 0; s < sizeof sizes / sizeof *sizes; s++) {
        int64_t n = sizes[s];
        rc_f hyper = rc_in(t, MOEK_HYPER_COUNT, 0, 1, 0);
        hyper.h[MOEK_HYPER_STEP] = 1234;
        ch_copy(&t->s, hyper.d, hyper.h, MOEK_HYPER_COUNT * 4, MOEK_COPY_H2D);
        rc_f x = rc_in(t, n, -3, 3, 0), y = rc_out(t, n), dx = rc_out(t, n);
        moek_jitter_fwd(C, x.h, y.h, n, 0.05f, hyper.h, 77);
        t->g.jitter_fwd(G, x.d, y.d, n, 0.05f, hyper.d, 77);
        if (ch_sync(&t->s, NM("cuda jitter_fwd n=%lld (bit-exact)", (long long)n)))
            rc_cmp(t, name, y, 0.0);
        moek_jitter_bwd(C, x.h, dx.h, n, 0.3f, hyper.h, -5);
        t->g.jitter_bwd(G, x.d, dx.d, n, 0.3f, hyper.d, -5);
        if (ch_sync(&t->s, NM("cuda jitter_bwd n=%lld (bit-exact)", (long long)n)))
            rc_cmp(t, name, dx, 0.0);
        ch_end_case(&t->s);
    }
}

static void rc_losses_and_stats(rc_env *t)
{
    /* B, T, E, k */
    static const int64_t shp[][4] = {{1, 1, 2, 1}, {3, 17, 8, 2}, {8, 128, 64, 6}, {4, 512, 256, 8}};
    char name[160];
    for (size_t s = 0; s < sizeof shp / sizeof *shp; s++) {
        int64_t B = shp[s][0], T = shp[s][1], E = shp[s][2], k = shp[s][3], N = B * T;
        rc_f p = rc_in(t, N * E, 0, 1, 0), loss = rc_out(t, 1), dp = rc_out(t, N * E);
        rc_f dloss = rc_in(t, 1, 0.5f, 2, 0), load = rc_out(t, E + 1), bias = rc_in(t, E, -1, 1, 0);
        rc_i idx = rc_iout(t, N * k), sr = rc_iout(t, N * k);
        for (int64_t i = 0; i < N * k; i++) {
            idx.h[i] = (int32_t)(ch_next(&t->rng) % (uint64_t)(i % 4 ? E : (E + 1) / 2));
            sr.h[i] = ch_next(&t->rng) % 5 ? (int32_t)i : -1;
        }
        rc_iup(t, idx);
        rc_iup(t, sr);
        moek_seq_balance_loss_fwd(C, p.h, idx.h, loss.h, B, T, E, k);
        t->g.seq_balance_loss_fwd(G, p.d, idx.d, loss.d, B, T, E, k);
        if (ch_sync(&t->s, NM("cuda seq_balance_loss_fwd B=%lld T=%lld E=%lld k=%lld", (long long)B,
                          (long long)T, (long long)E, (long long)k)))
            rc_cmp(t, name, loss, TOL);
        moek_seq_balance_loss_bwd(C, dloss.h, p.h, idx.h, dp.h, B, T, E, k);
        t->g.seq_balance_loss_bwd(G, dloss.d, p.d, idx.d, dp.d, B, T, E, k);
        if (ch_sync(&t->s, NM("cuda seq_balance_loss_bwd B=%lld T=%lld E=%lld k=%lld", (long long)B,
                          (long long)T, (long long)E, (long long)k)))
            rc_cmp(t, name, dp, TOL);
        moek_expert_load(C, idx.h, sr.h, load.h, N, E, k);
        t->g.expert_load(G, idx.d, sr.d, load.d, N, E, k);
        if (ch_sync(&t->s, NM("cuda expert_load N=%lld E=%lld k=%lld (exact)", (long long)N,
                          (long long)E, (long long)k)))
            rc_cmp(t, name, load, 0.0);
        ch_copy(&t->s, load.d, load.h, (E + 1) * 4, MOEK_COPY_H2D);
        moek_router_bias_update(C, bias.h, load.h, E, 0.001f);
        t->g.router_bias_update(G, bias.d, load.d, E, 0.001f);
        if (ch_sync(&t->s, NM("cuda router_bias_update E=%lld (exact)", (long long)E)))
            rc_cmp(t, name, bias, 0.0);
        ch_end_case(&t->s);
    }
}

static void rc_dispatch(rc_env *t)
{
    /* N, D, E, k, C */
    static const int64_t shp[][5] = {{1, 3, 4, 4, 1},     {37, 5, 4, 2, 3},    {300, 16, 8, 2, 40},
                                     {1024, 32, 16, 4, 200}, {4096, 8, 64, 8, 300}, {50, 4, 2, 1, 100}};
    char name[200];
    for (size_t s = 0; s < sizeof shp / sizeof *shp; s++) {
        int64_t N = shp[s][0], D = shp[s][1], E = shp[s][2], k = shp[s][3], Cap = shp[s][4];
        int64_t S = N * k, R = E * Cap;
        rc_f x = rc_in(t, N * D, -1, 1, 0), gt = rc_in(t, S, 0, 1, 8), xs = rc_out(t, R * D);
        rc_i idx = rc_iout(t, S), sr = rc_iout(t, S), er = rc_iout(t, 2 * E);
        for (int64_t i = 0; i < S; i++) /* a third of the slots piled on expert 0 */
            idx.h[i] = (int32_t)(i % 3 ? ch_next(&t->rng) % (uint64_t)E : 0);
        rc_iup(t, idx);
        moek_dispatch_by_score_fwd(C, x.h, idx.h, gt.h, xs.h, sr.h, er.h, N, D, E, k, Cap);
        t->g.dispatch_by_score_fwd(G, x.d, idx.d, gt.d, xs.d, sr.d, er.d, N, D, E, k, Cap);
        if (ch_sync(&t->s, NM("cuda dispatch_by_score_fwd N=%lld D=%lld E=%lld k=%lld C=%lld",
                          (long long)N, (long long)D, (long long)E, (long long)k, (long long)Cap))) {
            rc_icmp(t, NM("cuda dispatch_by_score_fwd slot_row N=%lld E=%lld k=%lld C=%lld",
                          (long long)N, (long long)E, (long long)k, (long long)Cap), sr);
            rc_icmp(t, NM("cuda dispatch_by_score_fwd expert_rows N=%lld E=%lld k=%lld C=%lld",
                          (long long)N, (long long)E, (long long)k, (long long)Cap), er);
            rc_cmp(t, NM("cuda dispatch_by_score_fwd xs N=%lld E=%lld k=%lld C=%lld (exact)",
                         (long long)N, (long long)E, (long long)k, (long long)Cap), xs, 0.0);
        }
        ch_end_case(&t->s);
    }
}

/* the codes the GPU reports: shapes at the call, bad ids at the next sync */
static void rc_errors(rc_env *t)
{
    rc_f sc = rc_in(t, 8, 0, 1, 0), gates = rc_out(t, 8), dl = rc_out(t, 8);
    rc_i idx = rc_iout(t, 8);
    t->g.topk_biased_fwd(G, sc.d, NULL, idx.d, gates.d, 1, 4, 5, 0, 1.0f);
    CHECK("cuda topk_biased_fwd k > E -> MOEK_E_SHAPE", t->s.gstatus == MOEK_E_SHAPE, "status %d",
          t->s.gstatus);
    t->s.gstatus = 0;
    t->g.topk_grouped_fwd(G, sc.d, NULL, idx.d, gates.d, 1, 8, 2, 3, 1, 0, 1.0f);
    CHECK("cuda topk_grouped_fwd groups not dividing E -> MOEK_E_SHAPE", t->s.gstatus == MOEK_E_SHAPE,
          "status %d", t->s.gstatus);
    t->s.gstatus = 0;
    for (int i = 0; i < 8; i++)
        idx.h[i] = i == 1 ? 7 : 0;
    rc_iup(t, idx);
    t->g.topk_softmax_bwd(G, gates.d, gates.d, idx.d, dl.d, 1, 4, 2);
    int rc = t->g.device_sync(&t->s.gctx, t->s.err, sizeof t->s.err);
    CHECK("cuda topk_softmax_bwd bad index -> MOEK_E_INDEX at sync", t->s.gstatus == MOEK_E_INDEX,
          "status %d rc %d", t->s.gstatus, rc);
    ch_end_case(&t->s);
}

int main(void)
{
    void *lib = ch_open("cuda_routing_kernels");
    if (!lib)
        return 0;
    rc_env *t = calloc(1, sizeof *t);
    if (!t)
        return 2;
#define RC_SYM(n) CH_ENTRY(t->g, n)
    ch_sym syms[] = {RC_KERNELS(RC_SYM)};
#undef RC_SYM
    int go = ch_start(lib, "cuda_routing_kernels", syms, CH_NSYMS(syms), &t->s);
    if (go <= 0) {
        free(t);
        return go < 0;
    }
    t->rng = 0x3243f6a8885a308dull;
    rc_sigmoid(t);
    rc_selection(t);
    rc_jitter(t);
    rc_losses_and_stats(t);
    rc_dispatch(t);
    rc_errors(t);
    t->g.device_fini(&t->s.gctx);
    printf("# worst relative error: %.3g (%s)\n", t->worst, t->worst_name);
    free(t);
    CHECK_DONE();
}
