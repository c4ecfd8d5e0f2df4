/* test_kernels_routing.c - the issue-4 routing kernels of the CPU library
 * (kernels/cpu/routing.c): forwards against double-precision loops written
 * independently (selections by qsort, not by repeated maximum), ties, every
 * error code, central finite-difference checks of every backward (fp32
 * forwards: h = 1e-2, |a - fd| <= 1e-3 + 2e-2 |fd|), jitter determinism,
 * the sequence balance loss's closed form, load counts with drops and the
 * aux-loss-free bias moving load towards balance. */
#include "test_kernels_cpu.h"

#define H_STEP 1e-2f
#define ATOL 1e-3
#define RTOL 2e-2

static moek_ctx tk_ctx(int *status)
{
    moek_ctx c;
    memset(&c, 0, sizeof c);
    c.status = status;
    return c;
}

/* ---- reference selection: qsort on (key desc, index asc), NaN last ------ */
typedef struct { float key; int32_t i; } ref_item;

static int ref_cmp(const void *a, const void *b)
{
    const ref_item *x = a, *y = b;
    float kx = isnan(x->key) ? -INFINITY : x->key, ky = isnan(y->key) ? -INFINITY : y->key;
    if (kx != ky)
        return kx > ky ? -1 : 1;
    return x->i < y->i ? -1 : x->i > y->i;
}

/* the k best of the `m` candidates cand[] by key[cand] */
static void ref_topk(const float *key, const int32_t *cand, int64_t m, int64_t k, int32_t *out)
{
    ref_item it[512];
    for (int64_t j = 0; j < m; j++)
        it[j] = (ref_item){key[cand[j]], cand[j]};
    qsort(it, (size_t)m, sizeof *it, ref_cmp);
    for (int64_t j = 0; j < k; j++)
        out[j] = it[j].i;
}

static void ref_gates(const float *s, const int32_t *ir, double *g, int64_t k, int renorm, double scale)
{
    double S = 0.0;
    for (int64_t j = 0; j < k; j++)
        S += s[ir[j]];
    for (int64_t j = 0; j < k; j++)
        g[j] = (renorm && S != 0.0 ? s[ir[j]] / S : s[ir[j]]) * scale;
}

static int idx_equal(const int32_t *a, const int32_t *b, int64_t n)
{
    return memcmp(a, b, (size_t)n * sizeof *a) == 0;
}

/* ---- sigmoid -------------------------------------------------------------- */
typedef struct { moek_ctx c; float *x, *y, *r; int64_t N, E; } st_sig;
static double loss_sig(void *p)
{
    st_sig *s = p;
    moek_sigmoid_fwd(&s->c, s->x, s->y, s->N, s->E);
    return tk_dot(s->r, s->y, s->N * s->E);
}

static void test_sigmoid(tk_rng *g)
{
    int status = 0;
    st_sig s = {tk_ctx(&status), NULL, NULL, NULL, 5, 7};
    int64_t n = s.N * s.E;
    s.x = tk_rand(g, n, -6, 6);
    s.y = tk_junk(n);
    s.r = tk_rand(g, n, -1, 1);
    double *ref = malloc((size_t)n * sizeof *ref);
    for (int64_t i = 0; i < n; i++)
        ref[i] = 1.0 / (1.0 + exp(-(double)s.x[i]));
    loss_sig(&s);
    double md = tk_maxdiff(s.y, ref, n);
    CHECK("routing sigmoid_fwd vs double", md <= 1e-6 && status == 0, "max diff %g", md);
    float *dx = tk_junk(n);
    moek_sigmoid_bwd(&s.c, s.r, s.y, dx, s.N, s.E);
    tk_gradcheck("routing grad sigmoid", loss_sig, &s, s.x, n, dx, H_STEP, ATOL, RTOL);
    free(s.x); free(s.y); free(s.r); free(dx); free(ref);
}

/* ---- biased top-k --------------------------------------------------------- */
static void test_biased_fwd(tk_rng *g)
{
    int status = 0;
    moek_ctx c = tk_ctx(&status);
    const int64_t N = 40, E = 16;
    float *s = tk_rand(g, N * E, 0, 1), *bias = tk_rand(g, E, -0.3f, 0.3f);
    /* ties: quantised scores and a few rows of equal keys */
    for (int64_t i = 0; i < N * E; i++)
        s[i] = roundf(s[i] * 8) / 8;
    for (int64_t e = 0; e < E; e++)
        s[3 * E + e] = 0.5f;
    bias[5] = bias[6] = 0.25f;
    int32_t cand[256], want[8];
    for (int32_t e = 0; e < E; e++)
        cand[e] = e;
    for (int64_t k = 1; k <= 8; k *= 2)
        for (int renorm = 0; renorm < 2; renorm++) {
            int32_t *idx = malloc((size_t)(N * k) * sizeof *idx);
            float *gates = tk_junk(N * k);
            float scale = renorm ? 2.5f : 1.0f;
            moek_topk_biased_fwd(&c, s, bias, idx, gates, N, E, k, renorm, scale);
            int ok_idx = 1;
            double md = 0.0;
            for (int64_t n = 0; n < N; n++) {
                float key[256];
                double gr[8];
                for (int64_t e = 0; e < E; e++)
                    key[e] = s[n * E + e] + bias[e];
                ref_topk(key, cand, E, k, want);
                ok_idx &= idx_equal(idx + n * k, want, k);
                ref_gates(s + n * E, want, gr, k, renorm, scale);
                double d = tk_maxdiff(gates + n * k, gr, k);
                md = d > md ? d : md;
            }
            char name[128];
            snprintf(name, sizeof name, "routing topk_biased_fwd k=%lld renorm=%d vs reference",
                     (long long)k, renorm);
            CHECK(name, ok_idx && md <= 1e-6 && status == 0, "idx %s, max gate diff %g, status %d",
                  ok_idx ? "equal" : "differ", md, status);
            free(idx); free(gates);
        }
    /* the bias picks, the gate is unbiased: expert 2 wins only through its bias */
    float s1[4] = {0.9f, 0.8f, 0.1f, 0.7f}, b1[4] = {0, 0, 1.0f, 0};
    int32_t i1[2];
    float g1[2];
    moek_topk_biased_fwd(&c, s1, b1, i1, g1, 1, 4, 2, 0, 1.0f);
    CHECK("routing topk_biased bias selects, gate unbiased",
          i1[0] == 2 && i1[1] == 0 && g1[0] == 0.1f && g1[1] == 0.9f, "idx %d %d gates %g %g",
          i1[0], i1[1], g1[0], g1[1]);
    /* NULL bias is plain top-k, ties to the lower index */
    float s2[5] = {0.3f, 0.7f, 0.7f, 0.2f, 0.7f};
    int32_t i2[3];
    float g2[3];
    moek_topk_biased_fwd(&c, s2, NULL, i2, g2, 1, 5, 3, 1, 3.0f);
    CHECK("routing topk_biased ties to lower index, renorm times scale",
          i2[0] == 1 && i2[1] == 2 && i2[2] == 4 && fabsf(g2[0] - 1.0f) < 1e-6f, "idx %d %d %d g0 %g",
          i2[0], i2[1], i2[2], g2[0]);
    /* k > E */
    status = 0;
    moek_topk_biased_fwd(&c, s2, NULL, i2, g2, 1, 5, 6, 0, 1.0f);
    CHECK("routing topk_biased k > E -> MOEK_E_SHAPE", status == MOEK_E_SHAPE, "status %d", status);
    free(s); free(bias);
}

typedef struct {
    moek_ctx c; float *x, *bias, *gates, *r; int32_t *idx, *idx0;
    int64_t N, E, k, renorm, groups, topk_groups; float scale; int grouped;
} st_sel;
static double loss_sel(void *p)
{
    st_sel *s = p;
    if (s->grouped)
        moek_topk_grouped_fwd(&s->c, s->x, s->bias, s->idx, s->gates, s->N, s->E, s->k, s->groups,
                              s->topk_groups, s->renorm, s->scale);
    else
        moek_topk_biased_fwd(&s->c, s->x, s->bias, s->idx, s->gates, s->N, s->E, s->k, s->renorm,
                             s->scale);
    if (!idx_equal(s->idx, s->idx0, s->N * s->k))
        return NAN; /* the selection moved: not differentiable here */
    return tk_dot(s->r, s->gates, s->N * s->k);
}

static void grad_sel(tk_rng *g, int grouped, int64_t renorm, int64_t k, float scale, const char *name)
{
    int status = 0;
    st_sel s = {tk_ctx(&status), NULL, NULL, NULL, NULL, NULL, NULL, 6, 12, k, renorm, 4, 2, scale,
                grouped};
    int64_t n = s.N * s.E;
    s.x = tk_rand(g, n, 0.05f, 1.0f);
    s.bias = tk_rand(g, s.E, -0.2f, 0.2f);
    s.gates = tk_zeros(s.N * k);
    s.r = tk_rand(g, s.N * k, -1, 1);
    s.idx = calloc((size_t)(s.N * k), sizeof *s.idx);
    s.idx0 = calloc((size_t)(s.N * k), sizeof *s.idx0);
    s.grouped = grouped;
    loss_sel(&s);
    memcpy(s.idx0, s.idx, (size_t)(s.N * k) * sizeof *s.idx);
    float *d = tk_junk(n);
    moek_topk_biased_bwd(&s.c, s.r, s.x, s.idx, d, s.N, s.E, k, renorm, scale);
    tk_gradcheck(name, loss_sel, &s, s.x, n, d, H_STEP, ATOL, RTOL);
    char sname[160];
    snprintf(sname, sizeof sname, "%s: no error", name);
    CHECK(sname, status == 0, "status %d", status);
    free(s.x); free(s.bias); free(s.gates); free(s.r); free(s.idx); free(s.idx0); free(d);
}

static void test_biased_bwd_errors(void)
{
    int status = 0;
    moek_ctx c = tk_ctx(&status);
    float s[4] = {1, 2, 3, 4}, dg[2] = {1, 1}, ds[4];
    int32_t idx[2] = {0, 4};
    moek_topk_biased_bwd(&c, dg, s, idx, ds, 1, 4, 2, 1, 1.0f);
    CHECK("routing topk_biased_bwd bad index -> MOEK_E_INDEX", status == MOEK_E_INDEX && ds[0] == 0.0f,
          "status %d", status);
}

/* ---- group-limited -------------------------------------------------------- */
static void ref_grouped(const float *s, const float *bias, int64_t E, int64_t k, int64_t groups,
                        int64_t tg, int32_t *out)
{
    int64_t gsize = E / groups;
    float key[256], gsc[256];
    int32_t gi[256], keptg[256], cand[256];
    for (int64_t e = 0; e < E; e++)
        key[e] = bias ? s[e] + bias[e] : s[e];
    for (int64_t gr = 0; gr < groups; gr++) {
        int32_t mem[256], top[2];
        for (int64_t j = 0; j < gsize; j++)
            mem[j] = (int32_t)(gr * gsize + j);
        ref_topk(key, mem, gsize, gsize >= 2 ? 2 : 1, top);
        gsc[gr] = gsize >= 2 ? key[top[0]] + key[top[1]] : key[top[0]];
        gi[gr] = (int32_t)gr;
    }
    ref_topk(gsc, gi, groups, tg, keptg);
    int64_t m = 0;
    for (int64_t e = 0; e < E; e++)
        for (int64_t j = 0; j < tg; j++)
            if (keptg[j] == e / gsize)
                cand[m++] = (int32_t)e;
    ref_topk(key, cand, m, k, out);
}

static void test_grouped(tk_rng *g)
{
    int status = 0;
    moek_ctx c = tk_ctx(&status);
    static const int64_t cfg[][4] = {{16, 4, 2, 4}, {16, 8, 3, 6}, {12, 12, 4, 3}, {64, 8, 4, 8},
                                     {8, 1, 1, 8}, {256, 8, 4, 8}};
    const int64_t N = 25;
    for (size_t ci = 0; ci < sizeof cfg / sizeof *cfg; ci++) {
        int64_t E = cfg[ci][0], G = cfg[ci][1], TG = cfg[ci][2], k = cfg[ci][3];
        float *s = tk_rand(g, N * E, 0, 1), *bias = tk_rand(g, E, -0.1f, 0.1f);
        for (int64_t i = 0; i < N * E; i += 3)
            s[i] = roundf(s[i] * 4) / 4; /* ties among experts and among groups */
        for (int use_bias = 0; use_bias < 2; use_bias++) {
            int32_t *idx = malloc((size_t)(N * k) * sizeof *idx), want[8];
            float *gates = tk_junk(N * k);
            status = 0;
            moek_topk_grouped_fwd(&c, s, use_bias ? bias : NULL, idx, gates, N, E, k, G, TG, 1, 2.0f);
            int ok = 1;
            double md = 0.0;
            for (int64_t n = 0; n < N; n++) {
                double gr[8];
                ref_grouped(s + n * E, use_bias ? bias : NULL, E, k, G, TG, want);
                ok &= idx_equal(idx + n * k, want, k);
                ref_gates(s + n * E, want, gr, k, 1, 2.0);
                double d = tk_maxdiff(gates + n * k, gr, k);
                md = d > md ? d : md;
            }
            char name[160];
            snprintf(name, sizeof name,
                     "routing topk_grouped_fwd E=%lld groups=%lld topk_groups=%lld k=%lld bias=%d",
                     (long long)E, (long long)G, (long long)TG, (long long)k, use_bias);
            CHECK(name, ok && md <= 1e-6 && status == 0, "idx %s, max gate diff %g, status %d",
                  ok ? "equal" : "differ", md, status);
            free(idx); free(gates);
        }
        free(s); free(bias);
    }
    /* by hand: groups {0,1} {2,3} {4,5} {6,7}; biased top-2 sums 1.0 1.1 1.3
     * 0.2, so groups 2 and 1 are kept; expert 7 has the best unbiased score
     * but its bias drops its group */
    float h[8] = {0.5f, 0.5f, 0.6f, 0.5f, 0.65f, 0.65f, 0.1f, 0.95f};
    float hb[8] = {0};
    hb[7] = -0.85f;
    int32_t hi[3];
    float hg[3];
    status = 0;
    moek_topk_grouped_fwd(&c, h, hb, hi, hg, 1, 8, 3, 4, 2, 0, 1.0f);
    CHECK("routing topk_grouped by hand", status == 0 && hi[0] == 4 && hi[1] == 5 && hi[2] == 2 &&
          hg[2] == 0.6f, "idx %d %d %d gate %g", hi[0], hi[1], hi[2], hg[2]);
    /* errors */
    /* {k, groups, topk_groups, E} */
    static const int64_t bad[][4] = {{2, 3, 1, 8}, {2, 4, 5, 8}, {2, 4, 0, 8}, {9, 4, 4, 8},
                                     {5, 4, 2, 8}, {2, 4, 2, 300}};
    static const char *why[] = {"groups not dividing E", "topk_groups > groups", "topk_groups = 0",
                                "k > E", "k > topk_groups * group size", "E > MOEK_ROUTE_MAX_E"};
    float *big = tk_zeros(300);
    int32_t bi[16];
    float bg[16];
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        status = 0;
        bi[0] = -7;
        moek_topk_grouped_fwd(&c, big, NULL, bi, bg, 1, bad[i][3], bad[i][0], bad[i][1], bad[i][2], 0,
                              1.0f);
        char name[128];
        snprintf(name, sizeof name, "routing topk_grouped %s -> MOEK_E_SHAPE", why[i]);
        CHECK(name, status == MOEK_E_SHAPE && bi[0] == -7, "status %d", status);
    }
    free(big);
}

/* ---- top-k then softmax -------------------------------------------------- */
typedef struct { moek_ctx c; float *x, *gates, *r; int32_t *idx, *idx0; int64_t N, E, k; } st_tks;
static double loss_tks(void *p)
{
    st_tks *s = p;
    moek_topk_softmax_fwd(&s->c, s->x, s->idx, s->gates, s->N, s->E, s->k);
    if (!idx_equal(s->idx, s->idx0, s->N * s->k))
        return NAN;
    return tk_dot(s->r, s->gates, s->N * s->k);
}

static void test_topk_softmax(tk_rng *g)
{
    int status = 0;
    moek_ctx c = tk_ctx(&status);
    int32_t cand[256], want[8];
    for (int32_t e = 0; e < 256; e++)
        cand[e] = e;
    for (int64_t k = 1; k <= 8; k += 3) {
        st_tks s = {tk_ctx(&status), NULL, NULL, NULL, NULL, NULL, 7, 10, k};
        int64_t n = s.N * s.E;
        s.x = tk_rand(g, n, -3, 3);
        s.gates = tk_junk(s.N * k);
        s.r = tk_rand(g, s.N * k, -1, 1);
        s.idx = calloc((size_t)(s.N * k), sizeof *s.idx);
        s.idx0 = calloc((size_t)(s.N * k), sizeof *s.idx0);
        moek_topk_softmax_fwd(&s.c, s.x, s.idx, s.gates, s.N, s.E, k);
        memcpy(s.idx0, s.idx, (size_t)(s.N * k) * sizeof *s.idx);
        int ok = 1;
        double md = 0.0;
        for (int64_t r = 0; r < s.N; r++) {
            ref_topk(s.x + r * s.E, cand, s.E, k, want);
            ok &= idx_equal(s.idx + r * k, want, k);
            double z = 0.0, gr[8];
            for (int64_t j = 0; j < k; j++)
                z += exp((double)s.x[r * s.E + want[j]]);
            for (int64_t j = 0; j < k; j++)
                gr[j] = exp((double)s.x[r * s.E + want[j]]) / z;
            double d = tk_maxdiff(s.gates + r * k, gr, k);
            md = d > md ? d : md;
        }
        char name[96];
        snprintf(name, sizeof name, "routing topk_softmax_fwd k=%lld vs reference", (long long)k);
        CHECK(name, ok && md <= 1e-6 && status == 0, "idx %s, max diff %g", ok ? "equal" : "differ",
              md);
        float *d = tk_junk(n);
        moek_topk_softmax_bwd(&s.c, s.r, s.gates, s.idx, d, s.N, s.E, k);
        snprintf(name, sizeof name, "routing grad topk_softmax k=%lld", (long long)k);
        if (k == 1) /* one gate is 1 whatever the logit: the gradient is exactly 0 */
            CHECK(name, d[s.idx[0]] == 0.0f && d[0] == 0.0f, "d %g", d[s.idx[0]]);
        else
            tk_gradcheck(name, loss_tks, &s, s.x, n, d, H_STEP, ATOL, RTOL);
        free(s.x); free(s.gates); free(s.r); free(s.idx); free(s.idx0); free(d);
    }
    float x[3] = {1, 1, 1}, gt[4];
    int32_t it[4] = {0, 1, 2, 3};
    moek_topk_softmax_fwd(&c, x, it, gt, 1, 3, 2);
    CHECK("routing topk_softmax ties to lower index", it[0] == 0 && it[1] == 1 && gt[0] == 0.5f,
          "idx %d %d g %g", it[0], it[1], gt[0]);
    status = 0;
    moek_topk_softmax_fwd(&c, x, it, gt, 1, 3, 4);
    CHECK("routing topk_softmax k > E -> MOEK_E_SHAPE", status == MOEK_E_SHAPE, "status %d", status);
    status = 0;
    it[0] = -1;
    float dg[2] = {1, 2}, dl[3];
    moek_topk_softmax_bwd(&c, dg, gt, it, dl, 1, 3, 2);
    CHECK("routing topk_softmax_bwd bad index -> MOEK_E_INDEX", status == MOEK_E_INDEX, "status %d",
          status);
}

/* ---- jitter --------------------------------------------------------------- */
typedef struct { moek_ctx c; float *x, *y, *r, *hyper; int64_t n; } st_jit;
static double loss_jit(void *p)
{
    st_jit *s = p;
    moek_jitter_fwd(&s->c, s->x, s->y, s->n, 0.2f, s->hyper, 42);
    return tk_dot(s->r, s->y, s->n);
}

static void test_jitter(tk_rng *g)
{
    int status = 0;
    moek_ctx c = tk_ctx(&status);
    const int64_t n = 200000;
    const float eps = 0.1f;
    float hyper[MOEK_HYPER_COUNT] = {0};
    hyper[MOEK_HYPER_STEP] = 7;
    float *ones = tk_zeros(n), *a = tk_junk(n), *b = tk_junk(n), *u = tk_junk(n);
    for (int64_t i = 0; i < n; i++)
        ones[i] = 1.0f;
    moek_jitter_fwd(&c, ones, a, n, eps, hyper, 1234);
    moek_jitter_fwd(&c, ones, b, n, eps, hyper, 1234);
    CHECK("routing jitter same seed and step -> same bits", memcmp(a, b, (size_t)n * 4) == 0,
          "differ");
    double mean = 0.0, lo = 2, hi = 0, m2 = 0.0;
    for (int64_t i = 0; i < n; i++) {
        mean += a[i];
        lo = a[i] < lo ? a[i] : lo;
        hi = a[i] > hi ? a[i] : hi;
    }
    mean /= (double)n;
    for (int64_t i = 0; i < n; i++)
        m2 += (a[i] - mean) * (a[i] - mean);
    double sd = sqrt(m2 / (double)n); /* uniform: eps / sqrt(3) = 0.0577 */
    CHECK("routing jitter u ~ U(1-eps, 1+eps): mean, range, spread",
          fabs(mean - 1.0) < 1e-3 && lo >= 1.0 - eps - 1e-6 && hi < 1.0 + eps + 1e-6 && hi > 1.0 + 0.99 * eps &&
              fabs(sd - eps / sqrt(3.0)) < 1e-3,
          "mean %.6f range [%.6f, %.6f] sd %.5f", mean, lo, hi, sd);
    hyper[MOEK_HYPER_STEP] = 8;
    moek_jitter_fwd(&c, ones, b, n, eps, hyper, 1234);
    int64_t same = 0;
    for (int64_t i = 0; i < n; i++)
        same += a[i] == b[i];
    CHECK("routing jitter next step -> different noise", same < n / 1000, "%lld of %lld equal",
          (long long)same, (long long)n);
    hyper[MOEK_HYPER_STEP] = 7;
    moek_jitter_fwd(&c, ones, b, n, eps, hyper, 1235);
    same = 0;
    for (int64_t i = 0; i < n; i++)
        same += a[i] == b[i];
    CHECK("routing jitter other seed -> different noise", same < n / 1000, "%lld equal",
          (long long)same);
    /* y = x u with the u just measured; backward dy u */
    float *x = tk_rand(g, 1000, -2, 2), *y = tk_junk(1000);
    moek_jitter_fwd(&c, x, y, 1000, eps, hyper, 1234);
    moek_jitter_bwd(&c, ones, u, 1000, eps, hyper, 1234);
    int ok = 1;
    for (int64_t i = 0; i < 1000; i++)
        ok &= y[i] == x[i] * a[i] && u[i] == a[i];
    CHECK("routing jitter y = x u, bwd recomputes u", ok && status == 0, "mismatch");
    moek_jitter_fwd(&c, x, y, 1000, 0.0f, hyper, 1234);
    CHECK("routing jitter eps = 0 is the identity", memcmp(x, y, 4000) == 0, "differ");
    st_jit s = {tk_ctx(&status), NULL, NULL, NULL, hyper, 40};
    s.x = tk_rand(g, s.n, -2, 2);
    s.y = tk_zeros(s.n);
    s.r = tk_rand(g, s.n, -1, 1);
    float *dx = tk_junk(s.n);
    moek_jitter_bwd(&s.c, s.r, dx, s.n, 0.2f, hyper, 42);
    tk_gradcheck("routing grad jitter", loss_jit, &s, s.x, s.n, dx, H_STEP, ATOL, RTOL);
    free(s.x); free(s.y); free(s.r); free(dx);
    free(ones); free(a); free(b); free(u); free(x); free(y);
}

/* ---- sequence-wise balance loss ------------------------------------------- */
typedef struct { moek_ctx c; float *p, *loss; int32_t *idx; int64_t B, T, E, k; } st_sb;
static double loss_sb(void *q)
{
    st_sb *s = q;
    moek_seq_balance_loss_fwd(&s->c, s->p, s->idx, s->loss, s->B, s->T, s->E, s->k);
    return s->loss[0];
}

static double ref_seq_balance(const float *p, const int32_t *idx, int64_t B, int64_t T, int64_t E,
                              int64_t k)
{
    double total = 0.0;
    for (int64_t b = 0; b < B; b++)
        for (int64_t e = 0; e < E; e++) {
            double f = 0.0, P = 0.0;
            for (int64_t s = b * T * k; s < (b + 1) * T * k; s++)
                f += idx[s] == e;
            for (int64_t t = b * T; t < (b + 1) * T; t++)
                P += p[t * E + e];
            total += (double)E * (f / (double)(T * k)) * (P / (double)T);
        }
    return total / (double)B;
}

static void test_seq_balance(tk_rng *g)
{
    int status = 0;
    moek_ctx c = tk_ctx(&status);
    const int64_t B = 3, T = 9, E = 6, k = 2, N = B * T;
    float *logits = tk_rand(g, N * E, -2, 2), *p = tk_zeros(N * E), gates[64 * 2], loss[1];
    int32_t *idx = calloc((size_t)(N * k), sizeof *idx);
    moek_softmax_fwd(&c, logits, p, N, E);
    moek_topk_fwd(&c, p, idx, gates, N, E, k, 0);
    loss[0] = NAN;
    moek_seq_balance_loss_fwd(&c, p, idx, loss, B, T, E, k);
    double ref = ref_seq_balance(p, idx, B, T, E, k);
    CHECK("routing seq_balance_loss_fwd vs double", check_close(loss[0], ref, 1e-6, 1e-6) &&
          status == 0, "%.8g vs %.8g", loss[0], ref);
    /* one sequence is the global loss */
    float whole[1];
    moek_balance_loss_fwd(&c, p, idx, whole, N, E, k);
    moek_seq_balance_loss_fwd(&c, p, idx, loss, 1, N, E, k);
    CHECK("routing seq_balance_loss B=1 equals balance_loss", check_close(loss[0], whole[0], 1e-6, 1e-6),
          "%.8g vs %.8g", loss[0], whole[0]);
    /* closed form: counts balanced in every sequence (k = 1) -> f_i = 1/E and
     * the loss is sum_i P_i = 1, whatever the probabilities */
    {
        const int64_t B2 = 2, T2 = 12;
        int32_t i2[24];
        float *p2 = tk_zeros(B2 * T2 * E);
        float *l2 = tk_rand(g, B2 * T2 * E, -3, 3);
        moek_softmax_fwd(&c, l2, p2, B2 * T2, E);
        for (int64_t t = 0; t < B2 * T2; t++)
            i2[t] = (int32_t)((t * 7 + t / T2) % E); /* each expert twice per sequence */
        moek_seq_balance_loss_fwd(&c, p2, i2, loss, B2, T2, E, 1);
        CHECK("routing seq_balance_loss = 1 at perfect balance (k=1)",
              check_close(loss[0], 1.0, 1e-6, 1e-6), "%.8g", loss[0]);
        /* everything to one expert with p = 1 there: E */
        for (int64_t t = 0; t < B2 * T2; t++) {
            i2[t] = 3;
            for (int64_t e = 0; e < E; e++)
                p2[t * E + e] = e == 3;
        }
        moek_seq_balance_loss_fwd(&c, p2, i2, loss, B2, T2, E, 1);
        CHECK("routing seq_balance_loss = E when collapsed", check_close(loss[0], (double)E, 1e-6, 1e-6),
              "%.8g", loss[0]);
        free(p2); free(l2);
    }
    moek_topk_fwd(&c, p, idx, gates, N, E, k, 0);
    st_sb s = {tk_ctx(&status), p, loss, idx, B, T, E, k};
    float *dp = tk_junk(N * E), one[1] = {1.0f};
    moek_seq_balance_loss_bwd(&c, one, p, idx, dp, B, T, E, k);
    tk_gradcheck("routing grad seq_balance_loss", loss_sb, &s, p, N * E, dp, H_STEP, ATOL, RTOL);
    status = 0;
    idx[5] = (int32_t)E;
    moek_seq_balance_loss_fwd(&c, p, idx, loss, B, T, E, k);
    CHECK("routing seq_balance_loss_fwd bad index -> MOEK_E_INDEX", status == MOEK_E_INDEX, "status %d",
          status);
    status = 0;
    moek_seq_balance_loss_bwd(&c, one, p, idx, dp, B, T, E, k);
    CHECK("routing seq_balance_loss_bwd bad index -> MOEK_E_INDEX", status == MOEK_E_INDEX, "status %d",
          status);
    status = 0;
    moek_seq_balance_loss_fwd(&c, p, idx, loss, 1, 1, 300, 1);
    CHECK("routing seq_balance_loss E > MOEK_ROUTE_MAX_E -> MOEK_E_SHAPE", status == MOEK_E_SHAPE,
          "status %d", status);
    free(logits); free(p); free(idx); free(dp);
}

/* ---- expert load, bias update --------------------------------------------- */
static void test_load_and_bias(tk_rng *g)
{
    int status = 0;
    moek_ctx c = tk_ctx(&status);
    /* 6 tokens, k = 2, E = 4, capacity 2: expert 0 gets 5 slots (3 dropped),
     * expert 3 none (dead) */
    int32_t idx[12] = {0, 1, 0, 2, 0, 1, 0, 2, 0, 1, 2, 1};
    int32_t slot_row[12], er[8];
    float x[6 * 3], xs[4 * 2 * 3], load[5];
    for (int i = 0; i < 18; i++)
        x[i] = (float)i;
    moek_dispatch_fwd(&c, x, idx, xs, slot_row, er, 6, 3, 4, 2, 2);
    for (int i = 0; i < 5; i++)
        load[i] = -1;
    moek_expert_load(&c, idx, slot_row, load, 6, 4, 2);
    CHECK("routing expert_load counts before capacity and drops",
          load[0] == 5 && load[1] == 4 && load[2] == 3 && load[3] == 0 && load[4] == 6 && status == 0,
          "load %g %g %g %g dropped %g", load[0], load[1], load[2], load[3], load[4]);
    moek_expert_load(&c, idx, NULL, load, 6, 4, 2);
    CHECK("routing expert_load without slot_row: 0 dropped", load[4] == 0 && load[0] == 5, "%g", load[4]);
    idx[3] = 9;
    moek_expert_load(&c, idx, NULL, load, 6, 4, 2);
    CHECK("routing expert_load bad index -> MOEK_E_INDEX", status == MOEK_E_INDEX && load[2] == 2,
          "status %d load2 %g", status, load[2]);
    status = 0;
    /* bias step: mean 6 */
    float bias[4] = {0.5f, 0.5f, 0.5f, 0.5f}, l4[5] = {10, 2, 6, 6, 99};
    moek_router_bias_update(&c, bias, l4, 4, 0.125f);
    CHECK("routing router_bias_update sign(mean - load)",
          bias[0] == 0.375f && bias[1] == 0.625f && bias[2] == 0.5f && bias[3] == 0.5f,
          "bias %g %g %g %g", bias[0], bias[1], bias[2], bias[3]);
    /* aux-loss-free balancing on a skewed batch: scores favour low experts;
     * the bias alone should pull the max/mean load down */
    const int64_t N = 512, E = 8, k = 2;
    float *sc = tk_zeros(N * E), gates[512 * 2], b8[8] = {0}, l8[9];
    int32_t *ix = calloc((size_t)(N * k), sizeof *ix);
    for (int64_t t = 0; t < N; t++)
        for (int64_t e = 0; e < E; e++)
            sc[t * E + e] = 1.0f / (1.0f + expf(-(tk_unif(g, -1, 1) - 0.25f * (float)e)));
    double first = 0, last = 0;
    for (int step = 0; step < 300; step++) {
        moek_topk_biased_fwd(&c, sc, b8, ix, gates, N, E, k, 1, 1.0f);
        moek_expert_load(&c, ix, NULL, l8, N, E, k);
        double mx = 0;
        for (int64_t e = 0; e < E; e++)
            mx = l8[e] > mx ? l8[e] : mx;
        double ratio = mx / ((double)N * k / E);
        if (step == 0)
            first = ratio;
        last = ratio;
        moek_router_bias_update(&c, b8, l8, E, 0.002f);
    }
    printf("# aux-free bias: max/mean expert load %.3f at step 0, %.3f after 300 updates\n", first,
           last);
    CHECK("routing aux-loss-free bias balances a skewed batch", first > 2.0 && last < 1.2 && status == 0,
          "max/mean load %.3f -> %.3f", first, last);
    free(sc); free(ix);
}

/* ---- dispatch by score ---------------------------------------------------- */
static void test_dispatch_by_score(tk_rng *g)
{
    int status = 0;
    moek_ctx c = tk_ctx(&status);
    static const int64_t shp[][5] = {{20, 3, 4, 2, 3}, {33, 5, 3, 1, 4}, {16, 2, 8, 4, 1},
                                     {9, 4, 2, 2, 20}, {1, 3, 4, 4, 1}};
    for (size_t si = 0; si < sizeof shp / sizeof *shp; si++) {
        int64_t N = shp[si][0], D = shp[si][1], E = shp[si][2], k = shp[si][3], C = shp[si][4];
        int64_t S = N * k, R = E * C;
        float *x = tk_rand(g, N * D, -1, 1), *gt = tk_rand(g, S, 0, 1), *xs = tk_junk(R * D);
        int32_t *idx = malloc((size_t)S * sizeof *idx), *sr = malloc((size_t)S * sizeof *sr);
        int32_t *er = malloc((size_t)(2 * E) * sizeof *er);
        for (int64_t s = 0; s < S; s++) {
            idx[s] = (int32_t)(tk_next(g) % (uint64_t)(s % 3 ? E : 1)); /* skewed to expert 0 */
            gt[s] = roundf(gt[s] * 4) / 4;                              /* ties */
        }
        moek_dispatch_by_score_fwd(&c, x, idx, gt, xs, sr, er, N, D, E, k, C);
        /* reference: per expert, its slots sorted by (gate desc, slot asc),
         * the first C kept, rows by slot order */
        int ok = status == 0;
        for (int64_t e = 0; e < E && ok; e++) {
            int32_t cand[4096], kept[4096];
            float key[4096];
            int64_t m = 0;
            for (int64_t s = 0; s < S; s++) {
                key[s] = gt[s];
                if (idx[s] == e)
                    cand[m++] = (int32_t)s;
            }
            int64_t nk = m < C ? m : C;
            ref_topk(key, cand, m, nk, kept);
            ok &= er[2 * e] == e * C && er[2 * e + 1] == nk;
            for (int64_t j = 0; j < m; j++) {
                int32_t s = cand[j];
                int64_t before = 0, in = 0;
                for (int64_t q = 0; q < nk; q++) {
                    in |= kept[q] == s;
                    before += kept[q] < s;
                }
                int32_t want = in ? (int32_t)(e * C + before) : -1;
                ok &= sr[s] == want;
                if (want >= 0)
                    ok &= memcmp(xs + want * D, x + (s / k) * D, (size_t)D * 4) == 0;
            }
            for (int64_t r = e * C + nk; r < (e + 1) * C; r++)
                for (int64_t d = 0; d < D; d++)
                    ok &= xs[r * D + d] == 0.0f;
        }
        char name[128];
        snprintf(name, sizeof name, "routing dispatch_by_score N=%lld E=%lld k=%lld C=%lld vs reference",
                 (long long)N, (long long)E, (long long)k, (long long)C);
        CHECK(name, ok, "mismatch (status %d)", status);
        /* with equal gates it is moek_dispatch_fwd's token order */
        for (int64_t s = 0; s < S; s++)
            gt[s] = 0.5f;
        int32_t *sr2 = malloc((size_t)S * sizeof *sr2), *er2 = malloc((size_t)(2 * E) * sizeof *er2);
        float *xs2 = tk_junk(R * D);
        moek_dispatch_by_score_fwd(&c, x, idx, gt, xs, sr, er, N, D, E, k, C);
        moek_dispatch_fwd(&c, x, idx, xs2, sr2, er2, N, D, E, k, C);
        snprintf(name, sizeof name, "routing dispatch_by_score equal gates = dispatch_fwd N=%lld",
                 (long long)N);
        CHECK(name, idx_equal(sr, sr2, S) && idx_equal(er, er2, 2 * E) &&
              memcmp(xs, xs2, (size_t)(R * D) * 4) == 0, "differ");
        free(sr2); free(er2); free(xs2);
        free(x); free(gt); free(xs); free(idx); free(sr); free(er);
    }
    /* by hand: expert 0 has tokens 0..3 with gates .2 .9 .5 .9, C = 2:
     * keep tokens 1 and 3 (tie .9: both), rows in token order */
    float x[4] = {10, 11, 12, 13}, gt[4] = {0.2f, 0.9f, 0.5f, 0.9f}, xs[2];
    int32_t idx[4] = {0, 0, 0, 0}, sr[4], er[2];
    moek_dispatch_by_score_fwd(&c, x, idx, gt, xs, sr, er, 4, 1, 1, 1, 2);
    CHECK("routing dispatch_by_score by hand", sr[0] == -1 && sr[1] == 0 && sr[2] == -1 && sr[3] == 1 &&
          xs[0] == 11 && xs[1] == 13 && er[1] == 2, "slot_row %d %d %d %d", sr[0], sr[1], sr[2], sr[3]);
    gt[0] = 0.9f; /* three-way tie at .9: the lower tokens win */
    moek_dispatch_by_score_fwd(&c, x, idx, gt, xs, sr, er, 4, 1, 1, 1, 2);
    CHECK("routing dispatch_by_score ties -> lower token", sr[0] == 0 && sr[1] == 1 && sr[3] == -1,
          "slot_row %d %d %d %d", sr[0], sr[1], sr[2], sr[3]);
    status = 0;
    moek_dispatch_by_score_fwd(&c, x, idx, gt, xs, sr, er, 4, 1, 1, 1, 0);
    CHECK("routing dispatch_by_score C = 0 -> MOEK_E_SHAPE", status == MOEK_E_SHAPE, "status %d", status);
    status = 0;
    idx[2] = 1;
    moek_dispatch_by_score_fwd(&c, x, idx, gt, xs, sr, er, 4, 1, 1, 1, 2);
    CHECK("routing dispatch_by_score bad index -> MOEK_E_INDEX, dropped",
          status == MOEK_E_INDEX && sr[2] == -1, "status %d slot %d", status, sr[2]);
}

int main(void)
{
    tk_rng g = {0x243F6A8885A308D3ull};
    test_sigmoid(&g);
    test_biased_fwd(&g);
    grad_sel(&g, 0, 0, 3, 1.0f, "routing grad topk_biased k=3");
    grad_sel(&g, 0, 1, 3, 2.5f, "routing grad topk_biased k=3 renorm scale=2.5");
    grad_sel(&g, 0, 0, 1, 0.5f, "routing grad topk_biased k=1 scale=0.5");
    grad_sel(&g, 1, 1, 4, 1.5f, "routing grad topk_grouped k=4 renorm scale=1.5");
    grad_sel(&g, 1, 0, 2, 2.0f, "routing grad topk_grouped k=2 scale=2");
    test_biased_bwd_errors();
    test_grouped(&g);
    test_topk_softmax(&g);
    test_jitter(&g);
    test_seq_balance(&g);
    test_load_and_bias(&g);
    test_dispatch_by_score(&g);
    CHECK_DONE();
}
