/* router.c - router maths, always fp32: softmax, top-k (ties -> lower
 * index), the Switch/GShard balance loss and the ST-MoE z-loss. */
#include <math.h>

#include "kcpu.h"

void moek_softmax_fwd(const moek_ctx *ctx, const float *logits, float *probs, int64_t N, int64_t E)
{
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, 4 * N * E))
    for (int64_t n = 0; n < N; n++) {
        const float *x = logits + n * E;
        float *p = probs + n * E;
        float m = -INFINITY;
        for (int64_t i = 0; i < E; i++)
            m = x[i] > m ? x[i] : m;
        double s = 0.0;
        for (int64_t i = 0; i < E; i++) {
            p[i] = expf(x[i] - m);
            s += p[i];
        }
        float inv = (float)(1.0 / s);
        for (int64_t i = 0; i < E; i++)
            p[i] *= inv;
    }
}

/* dlogits = p * (dp - sum_j dp_j p_j) */
void moek_softmax_bwd(const moek_ctx *ctx, const float *dprobs, const float *probs, float *dlogits,
                      int64_t N, int64_t E)
{
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, 4 * N * E))
    for (int64_t n = 0; n < N; n++) {
        const float *dp = dprobs + n * E, *p = probs + n * E;
        float *dl = dlogits + n * E;
        double dot = 0.0;
        for (int64_t i = 0; i < E; i++)
            dot += (double)dp[i] * p[i];
        for (int64_t i = 0; i < E; i++)
            dl[i] = p[i] * (float)((double)dp[i] - dot);
    }
}

/* NaN sorts below everything, so a row always yields k distinct experts. */
static inline float kcpu_key(float s) { return isnan(s) ? -INFINITY : s; }

/* Is (sa, a) ahead of (sb, b) in the order: score descending, index ascending? */
static inline int kcpu_ahead(float sa, int64_t a, float sb, int64_t b)
{
    return sa > sb || (sa == sb && a < b);
}

/* Selection by repeated maximum: pick j is the best element behind pick j-1
 * in the total order, so no "taken" marks (and no scratch memory) are
 * needed; O(E k) per row. */
void moek_topk_fwd(const moek_ctx *ctx, const float *scores, int32_t *idx, float *gates,
                   int64_t N, int64_t E, int64_t k, int64_t renorm)
{
    if (k > E || k < 0) {
        kcpu_fail(ctx, MOEK_E_SHAPE);
        return;
    }
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, N * E * k))
    for (int64_t n = 0; n < N; n++) {
        const float *s = scores + n * E;
        int32_t *ir = idx + n * k;
        float *gr = gates + n * k;
        float prev_s = INFINITY;
        int64_t prev_i = -1;
        double sum = 0.0;
        for (int64_t j = 0; j < k; j++) {
            int64_t best = -1;
            float best_s = 0.0f;
            for (int64_t e = 0; e < E; e++) {
                float se = kcpu_key(s[e]);
                if (!kcpu_ahead(prev_s, prev_i, se, e))
                    continue; /* already taken */
                if (best < 0 || kcpu_ahead(se, e, best_s, best)) {
                    best = e;
                    best_s = se;
                }
            }
            ir[j] = (int32_t)best;
            gr[j] = s[best];
            sum += s[best];
            prev_s = best_s;
            prev_i = best;
        }
        if (renorm && sum != 0.0) {
            float inv = (float)(1.0 / sum);
            for (int64_t j = 0; j < k; j++)
                gr[j] *= inv;
        }
    }
}

/* Without renorm gates are the chosen scores: dS_i = dg_i.  With renorm,
 * g_j = s_j / S (S the sum over the k chosen), so for a chosen i
 * dS_i = (dg_i - sum_j dg_j g_j) / S.  Experts not chosen get 0. */
void moek_topk_bwd(const moek_ctx *ctx, const float *dgates, const float *scores, const int32_t *idx,
                   float *dscores, int64_t N, int64_t E, int64_t k, int64_t renorm)
{
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, N * (E + 2 * k)))
    for (int64_t n = 0; n < N; n++) {
        const float *s = scores + n * E, *dg = dgates + n * k;
        const int32_t *ir = idx + n * k;
        float *ds = dscores + n * E;
        memset(ds, 0, (size_t)E * sizeof *ds);
        int bad = 0;
        for (int64_t j = 0; j < k; j++)
            bad |= ir[j] < 0 || ir[j] >= E;
        if (bad) {
            kcpu_fail(ctx, MOEK_E_INDEX);
            continue;
        }
        if (!renorm) {
            for (int64_t j = 0; j < k; j++)
                ds[ir[j]] += dg[j];
            continue;
        }
        double S = 0.0, dot = 0.0;
        for (int64_t j = 0; j < k; j++)
            S += s[ir[j]];
        if (S == 0.0)
            continue;
        for (int64_t j = 0; j < k; j++)
            dot += (double)dg[j] * (s[ir[j]] / S);
        for (int64_t j = 0; j < k; j++)
            ds[ir[j]] += (float)(((double)dg[j] - dot) / S);
    }
}

/* loss = E sum_i f_i P_i with f_i = count_i / (N k), P_i = mean_t probs[t,i].
 * One pass per expert over idx and over its probability column: O(E N (k+1))
 * and no per-expert scratch array. */
void moek_balance_loss_fwd(const moek_ctx *ctx, const float *probs, const int32_t *idx, float *loss,
                           int64_t N, int64_t E, int64_t k)
{
    for (int64_t s = 0; s < N * k; s++)
        if (idx[s] < 0 || idx[s] >= E)
            kcpu_fail(ctx, MOEK_E_INDEX);
    if (N <= 0 || k <= 0) {
        loss[0] = 0.0f;
        return;
    }
    double total = 0.0; /* sum_i count_i * sum_t probs[t,i] */
#pragma omp parallel for schedule(static) reduction(+ : total) num_threads(kcpu_team(ctx, E * N * (k + 1)))
    for (int64_t e = 0; e < E; e++) {
        int64_t count = 0;
        for (int64_t s = 0; s < N * k; s++)
            count += idx[s] == e;
        if (!count)
            continue;
        double col = 0.0;
        for (int64_t t = 0; t < N; t++)
            col += probs[t * E + e];
        total += (double)count * col;
    }
    loss[0] = (float)((double)E * total / ((double)N * (double)N * (double)k));
}

/* dprobs[t,i] = dloss * E * f_i / N; f_i counted per row of the output. */
void moek_balance_loss_bwd(const moek_ctx *ctx, const float *dloss, const float *probs,
                           const int32_t *idx, float *dprobs, int64_t N, int64_t E, int64_t k)
{
    (void)probs;
    if (N <= 0 || E <= 0)
        return;
    /* the first row holds count_i while counting; the scale turns it into the
     * gradient and the other rows copy it */
    float *row0 = dprobs;
    memset(row0, 0, (size_t)E * sizeof *row0);
    for (int64_t s = 0; s < N * k; s++) {
        int64_t e = idx[s];
        if (e < 0 || e >= E) {
            kcpu_fail(ctx, MOEK_E_INDEX);
            continue;
        }
        row0[e] += 1.0f;
    }
    double c = k > 0 ? (double)dloss[0] * (double)E / ((double)N * (double)N * (double)k) : 0.0;
    for (int64_t i = 0; i < E; i++)
        row0[i] = (float)(row0[i] * c);
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, N * E))
    for (int64_t t = 1; t < N; t++)
        memcpy(dprobs + t * E, row0, (size_t)E * sizeof *row0);
}

/* loss = mean_t lse_t^2; dlogits = 2 lse_t softmax_t dloss / N */
void moek_zloss_fwd(const moek_ctx *ctx, const float *logits, float *loss, int64_t N, int64_t E)
{
    double total = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : total) num_threads(kcpu_team(ctx, 4 * N * E))
    for (int64_t n = 0; n < N; n++) {
        double l = kcpu_row_lse(logits + n * E, E);
        total += l * l;
    }
    loss[0] = N > 0 ? (float)(total / (double)N) : 0.0f;
}

void moek_zloss_bwd(const moek_ctx *ctx, const float *dloss, const float *logits, float *dlogits,
                    int64_t N, int64_t E)
{
    double g = N > 0 ? 2.0 * (double)dloss[0] / (double)N : 0.0;
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, 4 * N * E))
    for (int64_t n = 0; n < N; n++) {
        const float *x = logits + n * E;
        float *d = dlogits + n * E;
        double l = kcpu_row_lse(x, E);
        for (int64_t i = 0; i < E; i++)
            d[i] = (float)(g * l * exp((double)x[i] - l));
    }
}
