/* test_kernels_routing_fd64.c - the routing backward kernels (fp32) against
 * central finite differences of double-precision re-implementations of
 * their forwards (issue 4: "finite-difference checks in fp64").
 *
 * Each op's forward is written again here in double, independently of
 * kernels/cpu: sigmoid, top-k with renorm, biased top-k (bias selects, the
 * unbiased score gates, times a scale), group-limited top-k, top-k then
 * softmax, the balance loss and the per-sequence balance loss.  The scalar
 * is L = sum r * out for a fixed random r; every input coordinate is moved by
 * h = 1e-6 both ways in double (truncation ~h^2, rounding ~1e-16/h: both
 * far below the tolerance) and (L+ - L-) / 2h is compared with the fp32
 * backward kernel fed dout = r: |a - fd| <= 1e-3 |fd| + 1e-6.
 *
 * Top-k boundaries: the selection is recomputed in double at x + h and x - h;
 * when it differs from the selection at x, the perturbation crossed a
 * boundary (the function jumps there, no derivative exists) and the point is
 * not compared but counted.  Random inputs keep every gap between the k-th
 * and the (k+1)-th key far above h, so none is skipped there (checked:
 * skipped == 0); a planted near-tie (gap 6e-8 < h) must be detected at
 * exactly its two coordinates, and the raw difference quotient there must
 * be off by more than the tolerance (the detection is needed: at a tie the
 * one-sided slopes differ).  The
 * balance losses take the selection as a constant (f_i has no gradient), so
 * their difference quotients hold the forward's idx fixed. */
#include "test_kernels_cpu.h"

#define FD_H 1e-6
#define FD_RTOL 1e-3
#define FD_ATOL 1e-6
#define MAXE 64
#define MAXK 8

static moek_ctx fd_ctx(int *status)
{
    moek_ctx c;
    memset(&c, 0, sizeof c);
    c.status = status;
    return c;
}

/* ---- double reference forwards ------------------------------------------ */
typedef enum { OP_TOPK, OP_BIASED, OP_GROUPED, OP_TOPK_SOFTMAX } sel_op;

typedef struct {
    sel_op op;
    int64_t N, E, k, renorm, groups, topk_groups;
    double scale;
    const float *bias; /* NULL: none */
    const float *r;    /* [N, k] */
} sel_cfg;

/* indices of the k largest key[cand[j]], ties to the lower index, by
 * selection sort (the kernels use a different method) */
static void fd_best(const double *key, const int32_t *cand, int64_t m, int64_t k, int32_t *out)
{
    char used[MAXE] = {0};
    for (int64_t j = 0; j < k; j++) {
        int64_t b = -1;
        for (int64_t q = 0; q < m; q++)
            if (!used[q] && (b < 0 || key[cand[q]] > key[cand[b]] ||
                             (key[cand[q]] == key[cand[b]] && cand[q] < cand[b])))
                b = q;
        used[b] = 1;
        out[j] = cand[b];
    }
}

/* one row: idx (k) and gates (k) in double */
static void fd_row(const sel_cfg *c, const double *x, int32_t *idx, double *gates)
{
    int64_t E = c->E, k = c->k;
    double key[MAXE];
    int32_t cand[MAXE];
    int64_t m = 0;
    for (int64_t e = 0; e < E; e++)
        key[e] = x[e] + (c->bias && c->op != OP_TOPK_SOFTMAX ? (double)c->bias[e] : 0.0);
    if (c->op == OP_GROUPED) {
        int64_t gs = E / c->groups;
        double gsc[MAXE] = {0};
        int32_t gi[MAXE] = {0}, keep[MAXE];
        for (int64_t g = 0; g < c->groups; g++) {
            int32_t mem[MAXE], top[2];
            for (int64_t j = 0; j < gs; j++)
                mem[j] = (int32_t)(g * gs + j);
            fd_best(key, mem, gs, gs >= 2 ? 2 : 1, top);
            gsc[g] = gs >= 2 ? key[top[0]] + key[top[1]] : key[top[0]];
            gi[g] = (int32_t)g;
        }
        fd_best(gsc, gi, c->groups, c->topk_groups, keep);
        for (int64_t e = 0; e < E; e++)
            for (int64_t j = 0; j < c->topk_groups; j++)
                if (keep[j] == e / gs)
                    cand[m++] = (int32_t)e;
    } else {
        for (int64_t e = 0; e < E; e++)
            cand[m++] = (int32_t)e;
    }
    fd_best(key, cand, m, k, idx);
    if (c->op == OP_TOPK_SOFTMAX) {
        double mx = x[idx[0]], z = 0.0;
        for (int64_t j = 0; j < k; j++)
            z += exp(x[idx[j]] - mx);
        for (int64_t j = 0; j < k; j++)
            gates[j] = exp(x[idx[j]] - mx) / z;
        return;
    }
    double S = 0.0;
    for (int64_t j = 0; j < k; j++)
        S += x[idx[j]];
    for (int64_t j = 0; j < k; j++)
        gates[j] = (c->renorm ? x[idx[j]] / S : x[idx[j]]) * c->scale;
}

/* L = sum r * gates over all rows; idx_out gets the selection */
static double fd_sel_loss(const sel_cfg *c, const double *x, int32_t *idx_out)
{
    double L = 0.0, g[MAXK];
    for (int64_t n = 0; n < c->N; n++) {
        fd_row(c, x + n * c->E, idx_out + n * c->k, g);
        for (int64_t j = 0; j < c->k; j++)
            L += (double)c->r[n * c->k + j] * g[j];
    }
    return L;
}

typedef struct { int64_t bad, skipped, checked; double worst, fdmax; int64_t worst_i; double wa, wfd; } fd_res;

/* central differences of a selection op in double at x (fp32 values) against
 * grad; skip[i] (if not NULL) records the coordinates whose perturbation
 * changed the selection, raw[i] the difference quotient there */
static fd_res fd_sel_check(const sel_cfg *c, const float *x, const float *grad, char *skip, double *raw)
{
    int64_t n = c->N * c->E;
    double *xd = calloc((size_t)n, sizeof *xd);
    int32_t *i0 = malloc((size_t)(c->N * c->k) * sizeof *i0), *i1 = malloc((size_t)(c->N * c->k) * sizeof *i1);
    for (int64_t i = 0; i < n; i++)
        xd[i] = x[i];
    fd_sel_loss(c, xd, i0);
    fd_res R = {0, 0, 0, 0.0, 0.0, -1, 0, 0};
    for (int64_t i = 0; i < n; i++) {
        double x0 = xd[i];
        xd[i] = x0 + FD_H;
        double lp = fd_sel_loss(c, xd, i1);
        int crossed = memcmp(i0, i1, (size_t)(c->N * c->k) * sizeof *i0) != 0;
        xd[i] = x0 - FD_H;
        double lm = fd_sel_loss(c, xd, i1);
        crossed |= memcmp(i0, i1, (size_t)(c->N * c->k) * sizeof *i0) != 0;
        xd[i] = x0;
        double fd = (lp - lm) / (2.0 * FD_H);
        if (skip)
            skip[i] = (char)crossed;
        if (raw)
            raw[i] = fd;
        if (crossed) {
            R.skipped++;
            continue;
        }
        R.checked++;
        R.fdmax = fabs(fd) > R.fdmax ? fabs(fd) : R.fdmax;
        double err = fabs((double)grad[i] - fd);
        if (err > FD_RTOL * fabs(fd) + FD_ATOL) {
            R.bad++;
            if (err > R.worst) {
                R.worst = err;
                R.worst_i = i;
                R.wa = grad[i];
                R.wfd = fd;
            }
        }
    }
    free(xd); free(i0); free(i1);
    return R;
}

/* the fp32 forward kernel's selection must be the double reference's */
static int fd_same_selection(const sel_cfg *c, const float *x, const int32_t *idx)
{
    int64_t n = c->N * c->E;
    double *xd = calloc((size_t)n, sizeof *xd);
    int32_t *i0 = malloc((size_t)(c->N * c->k) * sizeof *i0);
    for (int64_t i = 0; i < n; i++)
        xd[i] = x[i];
    fd_sel_loss(c, xd, i0);
    int same = memcmp(i0, idx, (size_t)(c->N * c->k) * sizeof *i0) == 0;
    free(xd); free(i0);
    return same;
}

static void report(const char *name, fd_res R, int same, int status, int want_no_skip)
{
    CHECK(name, same && status == 0 && R.bad == 0 && R.checked > 0 && R.fdmax > 1e-3 &&
          (!want_no_skip || R.skipped == 0),
          "selection %s, status %d, %lld of %lld off (worst at %lld: analytic %.9g fd %.9g), "
          "max |fd| %.3g, %lld skipped", same ? "same" : "differs", status, (long long)R.bad,
          (long long)R.checked, (long long)R.worst_i, R.wa, R.wfd, R.fdmax, (long long)R.skipped);
}

/* positive scores whose sorted neighbours in a row are >= 1e-3 apart: no
 * h-sized move can reorder them (fp32 spacing is 6e-8 at 1) */
static float *spread_scores(tk_rng *g, int64_t N, int64_t E, float lo, float hi)
{
    float *s = tk_rand(g, N * E, lo, hi);
    for (int64_t n = 0; n < N; n++)
        for (int64_t e = 0; e < E; e++) {
            float *v = s + n * E + e;
            *v = lo + (hi - lo) * (float)((tk_next(g) >> 40) % 1000) / 1000.0f;
            for (int64_t q = 0; q < e; q++) /* redraw a too-close value */
                if (fabsf(s[n * E + q] - *v) < 1e-3f * (hi - lo)) {
                    *v = lo + (hi - lo) * (float)((tk_next(g) >> 40) % 1000) / 1000.0f;
                    q = -1;
                }
        }
    return s;
}

static void test_selection(tk_rng *g, sel_op op, int64_t E, int64_t k, int64_t renorm, double scale,
                           int use_bias, const char *name)
{
    int status = 0;
    moek_ctx c = fd_ctx(&status);
    const int64_t N = 5;
    sel_cfg cfg = {op, N, E, k, renorm, 4, 2, scale, NULL, NULL};
    float *x = op == OP_TOPK_SOFTMAX ? spread_scores(g, N, E, -3, 3) : spread_scores(g, N, E, 0.05f, 1);
    float *bias = tk_zeros(E), *r = tk_rand(g, N * k, -1, 1), *gates = tk_junk(N * k);
    float *d = tk_junk(N * E);
    int32_t *idx = calloc((size_t)(N * k), sizeof *idx);
    if (use_bias) /* multiples of 1/64 keep score + bias gaps well above h */
        for (int64_t e = 0; e < E; e++)
            bias[e] = (float)((int)(tk_next(g) % 17) - 8) / 64.0f;
    cfg.bias = use_bias ? bias : NULL;
    cfg.r = r;
    switch (op) {
    case OP_TOPK:
        moek_topk_fwd(&c, x, idx, gates, N, E, k, renorm);
        moek_topk_bwd(&c, r, x, idx, d, N, E, k, renorm);
        break;
    case OP_BIASED:
        moek_topk_biased_fwd(&c, x, cfg.bias, idx, gates, N, E, k, renorm, (float)scale);
        moek_topk_biased_bwd(&c, r, x, idx, d, N, E, k, renorm, (float)scale);
        break;
    case OP_GROUPED:
        moek_topk_grouped_fwd(&c, x, cfg.bias, idx, gates, N, E, k, cfg.groups, cfg.topk_groups, renorm,
                              (float)scale);
        moek_topk_biased_bwd(&c, r, x, idx, d, N, E, k, renorm, (float)scale);
        break;
    case OP_TOPK_SOFTMAX:
        moek_topk_softmax_fwd(&c, x, idx, gates, N, E, k);
        moek_topk_softmax_bwd(&c, r, gates, idx, d, N, E, k);
        break;
    }
    fd_res R = fd_sel_check(&cfg, x, d, NULL, NULL);
    report(name, R, fd_same_selection(&cfg, x, idx), status, 1);
    free(x); free(bias); free(r); free(gates); free(d); free(idx);
}

/* a planted near-tie at the k-th / (k+1)-th place of row 1: the crossing
 * is detected at exactly those two coordinates, everything else checks */
static void test_boundary(tk_rng *g)
{
    int status = 0;
    moek_ctx c = fd_ctx(&status);
    const int64_t N = 3, E = 6, k = 2;
    float *x = spread_scores(g, N, E, 0.05f, 1);
    float *r = tk_rand(g, N * k, 0.5f, 1), *gates = tk_junk(N * k), *d = tk_junk(N * E);
    int32_t idx[3 * 2];
    /* row 1: 0.9 > 0.5 + 2^-24 > 0.5 > the rest: experts 2 and 4 straddle the
     * top-2 boundary 6e-8 apart, less than h = 1e-6 */
    float row[6] = {0.2f, 0.9f, nextafterf(0.5f, 1.0f), 0.1f, 0.5f, 0.3f};
    memcpy(x + E, row, sizeof row);
    sel_cfg cfg = {OP_TOPK, N, E, k, 1, 1, 1, 1.0, NULL, r};
    moek_topk_fwd(&c, x, idx, gates, N, E, k, 1);
    moek_topk_bwd(&c, r, x, idx, d, N, E, k, 1);
    char skip[18];
    double raw[18];
    fd_res R = fd_sel_check(&cfg, x, d, skip, raw);
    int where = R.skipped == 2 && skip[E + 2] && skip[E + 4];
    CHECK("routing fd64 top-k boundary: a crossing perturbation is detected at exactly its 2 coordinates",
          where && idx[2] == 1 && idx[3] == 2, "%lld skipped (coord 8: %d, coord 10: %d), row 1 idx %d %d",
          (long long)R.skipped, skip[E + 2], skip[E + 4], idx[2], idx[3]);
    CHECK("routing fd64 top-k boundary: the other coordinates still match", R.bad == 0 && R.checked == 16,
          "%lld of %lld off (worst analytic %.9g fd %.9g)", (long long)R.bad, (long long)R.checked, R.wa,
          R.wfd);
    /* without the detection: at a tie the renormalised gates are continuous
     * but the one-sided slopes differ (expert 2 in: its slope; out: 0), so
     * the quotient is about half the analytic value and would fail */
    double off = fabs(raw[E + 2] - d[E + 2]), tol = FD_RTOL * fabs(raw[E + 2]) + FD_ATOL;
    CHECK("routing fd64 top-k boundary: an undetected crossing would fail the comparison", off > 10 * tol,
          "|fd - analytic| at the crossing %.3g, tolerance %.3g (fd %.6g, analytic %.6g)", off, tol,
          raw[E + 2], d[E + 2]);
    free(x); free(r); free(gates); free(d);
}

/* ---- sigmoid ---------------------------------------------------------------- */
static void test_sigmoid(tk_rng *g)
{
    int status = 0;
    moek_ctx c = fd_ctx(&status);
    const int64_t N = 4, E = 9, n = N * E;
    float *x = tk_rand(g, n, -5, 5), *y = tk_junk(n), *r = tk_rand(g, n, -1, 1), *d = tk_junk(n);
    moek_sigmoid_fwd(&c, x, y, N, E);
    moek_sigmoid_bwd(&c, r, y, d, N, E);
    fd_res R = {0, 0, 0, 0.0, 0.0, -1, 0, 0};
    for (int64_t i = 0; i < n; i++) {
        double xp = (double)x[i] + FD_H, xm = (double)x[i] - FD_H;
        double fd = (double)r[i] * (1.0 / (1.0 + exp(-xp)) - 1.0 / (1.0 + exp(-xm))) / (2.0 * FD_H);
        double err = fabs((double)d[i] - fd);
        R.checked++;
        R.fdmax = fabs(fd) > R.fdmax ? fabs(fd) : R.fdmax;
        if (err > FD_RTOL * fabs(fd) + FD_ATOL && err > R.worst) {
            R.bad++;
            R.worst = err, R.worst_i = i, R.wa = d[i], R.wfd = fd;
        }
    }
    report("routing fd64 sigmoid", R, 1, status, 1);
    free(x); free(y); free(r); free(d);
}

/* ---- balance losses (selection held constant) ------------------------------- */
/* per sequence (B sequences of T tokens) E * sum_e f_e P_e, averaged over B;
 * B = 1 is the global balance loss */
static double fd_balance(const double *p, const int32_t *idx, int64_t B, int64_t T, int64_t E, int64_t k)
{
    double L = 0.0;
    for (int64_t b = 0; b < B; b++) {
        double f[MAXE] = {0}, P[MAXE] = {0};
        for (int64_t s = b * T * k; s < (b + 1) * T * k; s++)
            f[idx[s]] += 1.0 / (double)(T * k);
        for (int64_t t = b * T; t < (b + 1) * T; t++)
            for (int64_t e = 0; e < E; e++)
                P[e] += p[t * E + e] / (double)T;
        for (int64_t e = 0; e < E; e++)
            L += (double)E * f[e] * P[e];
    }
    return L / (double)B;
}

static void test_balance(tk_rng *g, int64_t B, int seq, const char *name)
{
    int status = 0;
    moek_ctx c = fd_ctx(&status);
    const int64_t T = 7, E = 6, k = 2, N = B * T, n = N * E;
    float *p = tk_rand(g, n, 0.01f, 1), *dp = tk_junk(n), loss[1] = {NAN}, one[1] = {1.0f};
    int32_t *idx = malloc((size_t)(N * k) * sizeof *idx);
    for (int64_t s = 0; s < N * k; s++)
        idx[s] = (int32_t)(tk_next(g) % (uint64_t)E);
    if (seq) {
        moek_seq_balance_loss_fwd(&c, p, idx, loss, B, T, E, k);
        moek_seq_balance_loss_bwd(&c, one, p, idx, dp, B, T, E, k);
    } else {
        moek_balance_loss_fwd(&c, p, idx, loss, N, E, k);
        moek_balance_loss_bwd(&c, one, p, idx, dp, N, E, k);
    }
    double *pd = calloc((size_t)n, sizeof *pd);   /* calloc: gcc -O1 cannot see the fill below */
    for (int64_t i = 0; i < n; i++)
        pd[i] = p[i];
    int64_t BB = seq ? B : 1, TT = seq ? T : N;
    double L0 = fd_balance(pd, idx, BB, TT, E, k);
    fd_res R = {0, 0, 0, 0.0, 0.0, -1, 0, 0};
    for (int64_t i = 0; i < n; i++) {
        double x0 = pd[i];
        pd[i] = x0 + FD_H;
        double lp = fd_balance(pd, idx, BB, TT, E, k);
        pd[i] = x0 - FD_H;
        double lm = fd_balance(pd, idx, BB, TT, E, k);
        pd[i] = x0;
        double fd = (lp - lm) / (2.0 * FD_H), err = fabs((double)dp[i] - fd);
        R.checked++;
        R.fdmax = fabs(fd) > R.fdmax ? fabs(fd) : R.fdmax;
        if (err > FD_RTOL * fabs(fd) + FD_ATOL) {
            R.bad++;
            if (err > R.worst)
                R.worst = err, R.worst_i = i, R.wa = dp[i], R.wfd = fd;
        }
    }
    int fwd_ok = fabs((double)loss[0] - L0) <= 1e-6 * fabs(L0);
    char fname[128];
    snprintf(fname, sizeof fname, "%s: forward vs double", name);
    CHECK(fname, fwd_ok, "kernel %.9g, double %.9g", loss[0], L0);
    report(name, R, 1, status, 1);
    free(p); free(dp); free(idx); free(pd);
}

int main(void)
{
    tk_rng g = {0x5851F42D4C957F2Dull};
    test_sigmoid(&g);
    test_selection(&g, OP_TOPK, 9, 3, 0, 1.0, 0, "routing fd64 topk k=3");
    test_selection(&g, OP_TOPK, 9, 3, 1, 1.0, 0, "routing fd64 topk k=3 renorm");
    test_selection(&g, OP_TOPK, 8, 8, 1, 1.0, 0, "routing fd64 topk k=E renorm");
    test_selection(&g, OP_BIASED, 12, 3, 1, 2.5, 1, "routing fd64 topk_biased k=3 renorm scale=2.5");
    test_selection(&g, OP_BIASED, 12, 1, 0, 0.5, 1, "routing fd64 topk_biased k=1 scale=0.5");
    test_selection(&g, OP_GROUPED, 16, 4, 1, 1.5, 1, "routing fd64 topk_grouped k=4 renorm scale=1.5");
    test_selection(&g, OP_GROUPED, 16, 2, 0, 2.0, 1, "routing fd64 topk_grouped k=2 scale=2");
    test_selection(&g, OP_TOPK_SOFTMAX, 10, 3, 0, 1.0, 0, "routing fd64 topk_softmax k=3");
    test_selection(&g, OP_TOPK_SOFTMAX, 10, 8, 0, 1.0, 0, "routing fd64 topk_softmax k=8");
    test_boundary(&g);
    test_balance(&g, 1, 0, "routing fd64 balance_loss");
    test_balance(&g, 3, 1, "routing fd64 seq_balance_loss");
    CHECK_DONE();
}
