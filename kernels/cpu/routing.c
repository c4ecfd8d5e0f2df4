/* routing.c - the routing schemes of issue 4, fp32 always (CUDA twin:
 * kernels/cuda/routing.cu): sigmoid scores, biased and group-limited top-k
 * (DeepSeek-V3), top-k then softmax (Mixtral's order), router jitter, the
 * sequence-wise balance loss, expert-load statistics, the aux-loss-free bias
 * step and capacity dropping by score.
 *
 * Every selection uses one order: key descending, expert index ascending,
 * NaN below everything; pick j is the best element behind pick j-1 in that
 * order (as moek_topk_fwd), so no "taken" marks are needed. */
#include <math.h>

#include "kcpu.h"

/* ---- sigmoid -------------------------------------------------------------- */
void moek_sigmoid_fwd(const moek_ctx *ctx, const float *logits, float *scores, int64_t N, int64_t E)
{
    int64_t n = N * E;
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, 8 * n))
    for (int64_t i = 0; i < n; i++)
        scores[i] = 1.0f / (1.0f + expf(-logits[i]));
}

void moek_sigmoid_bwd(const moek_ctx *ctx, const float *dscores, const float *scores, float *dlogits,
                      int64_t N, int64_t E)
{
    int64_t n = N * E;
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, 4 * n))
    for (int64_t i = 0; i < n; i++)
        dlogits[i] = dscores[i] * scores[i] * (1.0f - scores[i]);
}

/* ---- selection ------------------------------------------------------------ */
static inline float rt_key(float s) { return isnan(s) ? -INFINITY : s; }

static inline int rt_ahead(float sa, int64_t a, float sb, int64_t b)
{
    return sa > sb || (sa == sb && a < b);
}

/* The k best experts of one row by key s[e] + bias[e] (bias may be NULL),
 * among those whose group e / gsize is kept (keep NULL: all). */
static void rt_select(const float *s, const float *bias, const uint8_t *keep, int64_t gsize,
                      int32_t *ir, int64_t E, int64_t k)
{
    float prev_s = INFINITY;
    int64_t prev_i = -1;
    for (int64_t j = 0; j < k; j++) {
        int64_t best = -1;
        float best_s = 0.0f;
        for (int64_t e = 0; e < E; e++) {
            if (keep && !keep[e / gsize])
                continue;
            float se = rt_key(bias ? s[e] + bias[e] : s[e]);
            if (!rt_ahead(prev_s, prev_i, se, e))
                continue; /* already taken */
            if (best < 0 || rt_ahead(se, e, best_s, best)) {
                best = e;
                best_s = se;
            }
        }
        ir[j] = (int32_t)best;
        prev_s = best_s;
        prev_i = best;
    }
}

/* gates = the unbiased chosen scores, renormalised (when their sum is not
 * 0), times scale; the sum is taken in double in choice order */
static void rt_gates(const float *s, const int32_t *ir, float *gr, int64_t k, int64_t renorm,
                     float scale)
{
    double S = 0.0;
    for (int64_t j = 0; j < k; j++)
        S += s[ir[j]];
    if (renorm && S != 0.0) {
        double c = (double)scale / S;
        for (int64_t j = 0; j < k; j++)
            gr[j] = (float)((double)s[ir[j]] * c);
    } else {
        for (int64_t j = 0; j < k; j++)
            gr[j] = s[ir[j]] * scale;
    }
}

void moek_topk_biased_fwd(const moek_ctx *ctx, const float *scores, const float *bias, int32_t *idx,
                          float *gates, int64_t N, int64_t E, int64_t k, int64_t renorm, float scale)
{
    if (k < 0 || k > E || N < 0) {
        kcpu_fail(ctx, MOEK_E_SHAPE);
        return;
    }
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, N * E * k))
    for (int64_t n = 0; n < N; n++) {
        rt_select(scores + n * E, bias, NULL, 1, idx + n * k, E, k);
        rt_gates(scores + n * E, idx + n * k, gates + n * k, k, renorm, scale);
    }
}

/* g_j = c s_j with c = scale (no renorm) or scale / S, S = sum of the chosen
 * scores: dS_i = scale dg_i, or scale (dg_i - sum_j dg_j s_j / S) / S.  A
 * zero sum was not renormalised by the forward, so neither is it here. */
void moek_topk_biased_bwd(const moek_ctx *ctx, const float *dgates, const float *scores,
                          const int32_t *idx, float *dscores, int64_t N, int64_t E, int64_t k,
                          int64_t renorm, float scale)
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
        double S = 0.0, dot = 0.0;
        for (int64_t j = 0; j < k; j++)
            S += s[ir[j]];
        if (!renorm || S == 0.0) {
            for (int64_t j = 0; j < k; j++)
                ds[ir[j]] += dg[j] * scale;
            continue;
        }
        for (int64_t j = 0; j < k; j++)
            dot += (double)dg[j] * s[ir[j]];
        dot /= S;
        for (int64_t j = 0; j < k; j++)
            ds[ir[j]] += (float)((double)scale * ((double)dg[j] - dot) / S);
    }
}

void moek_topk_grouped_fwd(const moek_ctx *ctx, const float *scores, const float *bias, int32_t *idx,
                           float *gates, int64_t N, int64_t E, int64_t k, int64_t groups,
                           int64_t topk_groups, int64_t renorm, float scale)
{
    if (N < 0 || E <= 0 || E > MOEK_ROUTE_MAX_E || groups <= 0 || E % groups != 0 ||
        topk_groups < 1 || topk_groups > groups || k < 0 || k > topk_groups * (E / groups)) {
        kcpu_fail(ctx, MOEK_E_SHAPE);
        return;
    }
    int64_t gsize = E / groups;
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, N * E * (k + topk_groups)))
    for (int64_t n = 0; n < N; n++) {
        const float *s = scores + n * E;
        float gs[MOEK_ROUTE_MAX_E];
        uint8_t keep[MOEK_ROUTE_MAX_E];
        /* group score: sum of its two best keys (DeepSeek-V3), or its best */
        for (int64_t g = 0; g < groups; g++) {
            float t1 = -INFINITY, t2 = -INFINITY;
            for (int64_t e = g * gsize; e < (g + 1) * gsize; e++) {
                float v = rt_key(bias ? s[e] + bias[e] : s[e]);
                if (v > t1) {
                    t2 = t1;
                    t1 = v;
                } else if (v > t2) {
                    t2 = v;
                }
            }
            gs[g] = rt_key(gsize == 1 ? t1 : t1 + t2);
            keep[g] = 0;
        }
        float prev_s = INFINITY;
        int64_t prev_g = -1;
        for (int64_t j = 0; j < topk_groups; j++) {
            int64_t best = -1;
            float best_s = 0.0f;
            for (int64_t g = 0; g < groups; g++) {
                if (!rt_ahead(prev_s, prev_g, gs[g], g))
                    continue;
                if (best < 0 || rt_ahead(gs[g], g, best_s, best)) {
                    best = g;
                    best_s = gs[g];
                }
            }
            keep[best] = 1;
            prev_s = best_s;
            prev_g = best;
        }
        rt_select(s, bias, keep, gsize, idx + n * k, E, k);
        rt_gates(s, idx + n * k, gates + n * k, k, renorm, scale);
    }
}

/* ---- top-k then softmax --------------------------------------------------- */
void moek_topk_softmax_fwd(const moek_ctx *ctx, const float *logits, int32_t *idx, float *gates,
                           int64_t N, int64_t E, int64_t k)
{
    if (k < 0 || k > E || N < 0) {
        kcpu_fail(ctx, MOEK_E_SHAPE);
        return;
    }
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, N * E * k))
    for (int64_t n = 0; n < N; n++) {
        const float *x = logits + n * E;
        int32_t *ir = idx + n * k;
        float *gr = gates + n * k;
        rt_select(x, NULL, NULL, 1, ir, E, k);
        if (k == 0)
            continue;
        float m = x[ir[0]]; /* the largest chosen logit */
        double sum = 0.0;
        for (int64_t j = 0; j < k; j++) {
            gr[j] = expf(x[ir[j]] - m);
            sum += gr[j];
        }
        float inv = (float)(1.0 / sum);
        for (int64_t j = 0; j < k; j++)
            gr[j] *= inv;
    }
}

/* softmax over the chosen: dl_{idx_j} = g_j (dg_j - sum_i dg_i g_i) */
void moek_topk_softmax_bwd(const moek_ctx *ctx, const float *dgates, const float *gates,
                           const int32_t *idx, float *dlogits, int64_t N, int64_t E, int64_t k)
{
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, N * (E + 2 * k)))
    for (int64_t n = 0; n < N; n++) {
        const float *dg = dgates + n * k, *g = gates + n * k;
        const int32_t *ir = idx + n * k;
        float *dl = dlogits + n * E;
        memset(dl, 0, (size_t)E * sizeof *dl);
        int bad = 0;
        for (int64_t j = 0; j < k; j++)
            bad |= ir[j] < 0 || ir[j] >= E;
        if (bad) {
            kcpu_fail(ctx, MOEK_E_INDEX);
            continue;
        }
        double dot = 0.0;
        for (int64_t j = 0; j < k; j++)
            dot += (double)dg[j] * g[j];
        for (int64_t j = 0; j < k; j++)
            dl[ir[j]] += g[j] * (float)((double)dg[j] - dot);
    }
}

/* ---- router jitter ---------------------------------------------------------
 * u = 1 - eps + 2 eps r, r in [0, 1) from 24 bits of a splitmix64-style hash
 * of (seed, step, i): stateless, so the backward recomputes it and CUDA gets
 * the same bits (r is exact in fp32, and the twin rounds each operation
 * alone, as here). */
static inline uint64_t rt_mix(uint64_t z)
{
    z ^= z >> 30;
    z *= 0xbf58476d1ce4e5b9ull;
    z ^= z >> 27;
    z *= 0x94d049bb133111ebull;
    z ^= z >> 31;
    return z;
}

static inline uint64_t rt_stream(int64_t seed, const float *hyper)
{
    int64_t step = hyper ? (int64_t)hyper[MOEK_HYPER_STEP] : 0;
    return rt_mix((uint64_t)seed ^ rt_mix((uint64_t)step + 0x9e3779b97f4a7c15ull));
}

static inline float rt_jitter_u(uint64_t stream, int64_t i, float lo, float width)
{
    float r = (float)(rt_mix(stream + (uint64_t)i) >> 40) * (1.0f / 16777216.0f);
    float t = width * r;
    return lo + t;
}

void moek_jitter_fwd(const moek_ctx *ctx, const float *x, float *y, int64_t n, float eps,
                     const float *hyper, int64_t seed)
{
    uint64_t st = rt_stream(seed, hyper);
    float lo = 1.0f - eps, width = 2.0f * eps;
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, 16 * n))
    for (int64_t i = 0; i < n; i++)
        y[i] = x[i] * rt_jitter_u(st, i, lo, width);
}

void moek_jitter_bwd(const moek_ctx *ctx, const float *dy, float *dx, int64_t n, float eps,
                     const float *hyper, int64_t seed)
{
    moek_jitter_fwd(ctx, dy, dx, n, eps, hyper, seed); /* linear in x: the same map */
}

/* ---- sequence-wise balance loss -------------------------------------------
 * per sequence b: E sum_i (c_i / (T k)) (col_i / T), c_i its slot counts,
 * col_i its probability column sums; the loss is the mean over b. */
static int rt_seq_counts(const moek_ctx *ctx, const int32_t *idx, int64_t b, int64_t T, int64_t E,
                         int64_t k, int64_t *cnt)
{
    memset(cnt, 0, (size_t)E * sizeof *cnt);
    int bad = 0;
    for (int64_t s = b * T * k; s < (b + 1) * T * k; s++) {
        int64_t e = idx[s];
        if (e < 0 || e >= E)
            bad = 1;
        else
            cnt[e]++;
    }
    if (bad)
        kcpu_fail(ctx, MOEK_E_INDEX);
    return bad;
}

void moek_seq_balance_loss_fwd(const moek_ctx *ctx, const float *probs, const int32_t *idx,
                               float *loss, int64_t B, int64_t T, int64_t E, int64_t k)
{
    if (B < 0 || T < 0 || k < 0 || E < 0 || E > MOEK_ROUTE_MAX_E) {
        kcpu_fail(ctx, MOEK_E_SHAPE);
        return;
    }
    if (B == 0 || T == 0 || k == 0 || E == 0) {
        loss[0] = 0.0f;
        return;
    }
    double total = 0.0;
    for (int64_t b = 0; b < B; b++) {
        int64_t cnt[MOEK_ROUTE_MAX_E];
        double col[MOEK_ROUTE_MAX_E] = {0};
        rt_seq_counts(ctx, idx, b, T, E, k, cnt);
        for (int64_t t = b * T; t < (b + 1) * T; t++)
            for (int64_t e = 0; e < E; e++)
                col[e] += probs[t * E + e];
        double acc = 0.0;
        for (int64_t e = 0; e < E; e++)
            acc += (double)cnt[e] * col[e];
        total += (double)E * acc / ((double)T * (double)T * (double)k);
    }
    loss[0] = (float)(total / (double)B);
}

/* dprobs[t,i] = dloss E c_i(b) / (B T T k) for t in sequence b */
void moek_seq_balance_loss_bwd(const moek_ctx *ctx, const float *dloss, const float *probs,
                               const int32_t *idx, float *dprobs, int64_t B, int64_t T, int64_t E,
                               int64_t k)
{
    (void)probs;
    if (B < 0 || T < 0 || k < 0 || E < 0 || E > MOEK_ROUTE_MAX_E) {
        kcpu_fail(ctx, MOEK_E_SHAPE);
        return;
    }
    double c = k > 0 && T > 0 && B > 0
                   ? (double)dloss[0] * (double)E / ((double)B * (double)T * (double)T * (double)k)
                   : 0.0;
    for (int64_t b = 0; b < B; b++) {
        int64_t cnt[MOEK_ROUTE_MAX_E];
        rt_seq_counts(ctx, idx, b, T, E, k, cnt);
        for (int64_t t = b * T; t < (b + 1) * T; t++)
            for (int64_t e = 0; e < E; e++)
                dprobs[t * E + e] = (float)((double)cnt[e] * c);
    }
}

/* ---- expert load and the aux-loss-free bias step --------------------------- */
void moek_expert_load(const moek_ctx *ctx, const int32_t *idx, const int32_t *slot_row, float *load,
                      int64_t N, int64_t E, int64_t k)
{
    if (N < 0 || E < 0 || k < 0) {
        kcpu_fail(ctx, MOEK_E_SHAPE);
        return;
    }
    /* counts in int64: a float would stop counting at 2^24 */
    int64_t dropped = 0;
    memset(load, 0, (size_t)(E + 1) * sizeof *load);
    for (int64_t e = 0; e < E; e++) {
        int64_t c = 0;
        for (int64_t s = 0; s < N * k; s++)
            c += idx[s] == e;
        load[e] = (float)c;
    }
    for (int64_t s = 0; s < N * k; s++) {
        if (idx[s] < 0 || idx[s] >= E)
            kcpu_fail(ctx, MOEK_E_INDEX);
        if (slot_row && slot_row[s] == -1)
            dropped++;
    }
    load[E] = (float)dropped;
}

void moek_router_bias_update(const moek_ctx *ctx, float *bias, const float *load, int64_t E,
                             float rate)
{
    if (E <= 0) {
        if (E < 0)
            kcpu_fail(ctx, MOEK_E_SHAPE);
        return;
    }
    double mean = 0.0;
    for (int64_t e = 0; e < E; e++)
        mean += load[e];
    mean /= (double)E;
    for (int64_t e = 0; e < E; e++) {
        double d = mean - (double)load[e];
        bias[e] += d > 0.0 ? rate : d < 0.0 ? -rate : 0.0f;
    }
}

/* ---- capacity dropping by score --------------------------------------------
 * A slot s of an expert over capacity is kept when fewer than C of that
 * expert's slots are ahead of it (gate descending, slot index ascending):
 * O(S count_e) per such slot, only for experts over capacity.  slot_row
 * first holds -2 (kept) / -1 (dropped); kept slots then get rows in slot
 * order, as moek_dispatch_fwd. */
void moek_dispatch_by_score_fwd(const moek_ctx *ctx, const float *x, const int32_t *idx,
                                const float *gates, float *xs, int32_t *slot_row,
                                int32_t *expert_rows, int64_t N, int64_t D, int64_t E, int64_t k,
                                int64_t C)
{
    if (C <= 0 || N < 0 || D < 0 || E < 0 || k < 0) {
        kcpu_fail(ctx, MOEK_E_SHAPE);
        return;
    }
    int64_t S = N * k;
    for (int64_t e = 0; e < E; e++)
        expert_rows[2 * e + 1] = 0;
    for (int64_t s = 0; s < S; s++) {
        int64_t e = idx[s];
        if (e < 0 || e >= E)
            kcpu_fail(ctx, MOEK_E_INDEX);
        else
            expert_rows[2 * e + 1]++;
    }
#pragma omp parallel for schedule(dynamic, 64) num_threads(kcpu_team(ctx, S * 64))
    for (int64_t s = 0; s < S; s++) {
        int64_t e = idx[s];
        if (e < 0 || e >= E) {
            slot_row[s] = -1;
            continue;
        }
        int64_t rank = 0;
        if (expert_rows[2 * e + 1] > C) {
            float gs = rt_key(gates[s]);
            for (int64_t o = 0; o < S && rank < C; o++)
                rank += idx[o] == e && rt_ahead(rt_key(gates[o]), o, gs, s);
        }
        slot_row[s] = rank < C ? -2 : -1;
    }
    for (int64_t e = 0; e < E; e++) {
        expert_rows[2 * e] = (int32_t)(e * C);
        expert_rows[2 * e + 1] = 0;
    }
    for (int64_t s = 0; s < S; s++)
        if (slot_row[s] == -2) {
            int64_t e = idx[s];
            slot_row[s] = (int32_t)(e * C + expert_rows[2 * e + 1]++);
        }
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, S * D))
    for (int64_t s = 0; s < S; s++)
        if (slot_row[s] >= 0)
            memcpy(xs + (int64_t)slot_row[s] * D, x + (s / k) * D, (size_t)D * sizeof *xs);
    for (int64_t e = 0; e < E; e++) {
        int64_t used_end = e * C + expert_rows[2 * e + 1];
        if ((e + 1) * C > used_end)
            memset(xs + used_end * D, 0, (size_t)(((e + 1) * C - used_end) * D) * sizeof *xs);
    }
}
