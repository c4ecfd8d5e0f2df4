/* routing.cu - the routing schemes of issue 4, fp32 always; twin of
 * kernels/cpu/routing.c, and the place to read what each kernel means.
 *
 * Selection kernels run a thread per token: router rows are small (E <=
 * a few hundred, k <= 8) and one thread walking its row in the CPU's order
 * gives the CPU's choices exactly (ties to the lower index, NaN last)
 * without a cross-lane protocol.  Reductions that feed a scalar run in one
 * block in a fixed order, so results do not depend on scheduling. */
#include "kcuda.cuh"

#define RT_MAX_E MOEK_ROUTE_MAX_E

static bool rt_rows_ok(const moek_ctx *ctx, int64_t N, int64_t E)
{
    return kc_shape(ctx, N >= 0 && E >= 0 && N <= ((int64_t)1 << 36));
}

/* ---- sigmoid -------------------------------------------------------------- */
__global__ void k_sigmoid_fwd(const float *x, float *y, int64_t n)
{
    KC_GRID_STRIDE(i, n) y[i] = 1.0f / (1.0f + expf(-x[i]));
}

__global__ void k_sigmoid_bwd(const float *ds, const float *s, float *dx, int64_t n)
{
    KC_GRID_STRIDE(i, n) dx[i] = ds[i] * s[i] * (1.0f - s[i]);
}

extern "C" void moek_sigmoid_fwd(const moek_ctx *ctx, const float *logits, float *scores, int64_t N,
                                 int64_t E)
{
    if (!rt_rows_ok(ctx, N, E) || N * E == 0)
        return;
    k_sigmoid_fwd<<<kc_blocks(N * E), KCUDA_THREADS, 0, kc_stream(ctx)>>>(logits, scores, N * E);
    kc_launched(ctx);
}

extern "C" void moek_sigmoid_bwd(const moek_ctx *ctx, const float *dscores, const float *scores,
                                 float *dlogits, int64_t N, int64_t E)
{
    if (!rt_rows_ok(ctx, N, E) || N * E == 0)
        return;
    k_sigmoid_bwd<<<kc_blocks(N * E), KCUDA_THREADS, 0, kc_stream(ctx)>>>(dscores, scores, dlogits,
                                                                          N * E);
    kc_launched(ctx);
}

/* ---- selection ------------------------------------------------------------ */
__device__ inline float rt_key(float s) { return isnan(s) ? -INFINITY : s; }

__device__ inline bool rt_ahead(float sa, int64_t a, float sb, int64_t b)
{
    return sa > sb || (sa == sb && a < b);
}

/* k best of one row by s[e] + bias[e], among kept groups (keep NULL: all) */
__device__ void rt_select(const float *s, const float *bias, const uint8_t *keep, int64_t gsize,
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
            float se = rt_key(bias ? __fadd_rn(s[e], bias[e]) : s[e]);
            if (!rt_ahead(prev_s, prev_i, se, e))
                continue;
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

__device__ void rt_gates(const float *s, const int32_t *ir, float *gr, int64_t k, int64_t renorm,
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
            gr[j] = __fmul_rn(s[ir[j]], scale);
    }
}

__global__ void k_topk_biased_fwd(const float *scores, const float *bias, int32_t *idx, float *gates,
                                  int64_t N, int64_t E, int64_t k, int64_t renorm, float scale)
{
    KC_GRID_STRIDE(n, N) {
        rt_select(scores + n * E, bias, nullptr, 1, idx + n * k, E, k);
        rt_gates(scores + n * E, idx + n * k, gates + n * k, k, renorm, scale);
    }
}

extern "C" void moek_topk_biased_fwd(const moek_ctx *ctx, const float *scores, const float *bias,
                                     int32_t *idx, float *gates, int64_t N, int64_t E, int64_t k,
                                     int64_t renorm, float scale)
{
    if (!rt_rows_ok(ctx, N, E) || !kc_shape(ctx, k >= 0 && k <= E) || N == 0 || k == 0)
        return;
    k_topk_biased_fwd<<<kc_blocks(N), KCUDA_THREADS, 0, kc_stream(ctx)>>>(scores, bias, idx, gates,
                                                                          N, E, k, renorm, scale);
    kc_launched(ctx);
}

__global__ void k_topk_biased_bwd(const float *dgates, const float *scores, const int32_t *idx,
                                  float *dscores, int64_t N, int64_t E, int64_t k, int64_t renorm,
                                  float scale, int *st)
{
    KC_GRID_STRIDE(n, N) {
        const float *s = scores + n * E, *dg = dgates + n * k;
        const int32_t *ir = idx + n * k;
        float *ds = dscores + n * E;
        for (int64_t i = 0; i < E; i++)
            ds[i] = 0.0f;
        bool bad = false;
        for (int64_t j = 0; j < k; j++)
            bad |= ir[j] < 0 || ir[j] >= E;
        if (bad) {
            kc_dev_fail(st, MOEK_E_INDEX);
            continue;
        }
        double S = 0.0, dot = 0.0;
        for (int64_t j = 0; j < k; j++)
            S += s[ir[j]];
        if (!renorm || S == 0.0) {
            for (int64_t j = 0; j < k; j++)
                ds[ir[j]] = __fadd_rn(ds[ir[j]], __fmul_rn(dg[j], scale));
            continue;
        }
        for (int64_t j = 0; j < k; j++)
            dot += (double)dg[j] * s[ir[j]];
        dot /= S;
        for (int64_t j = 0; j < k; j++)
            ds[ir[j]] += (float)((double)scale * ((double)dg[j] - dot) / S);
    }
}

extern "C" void moek_topk_biased_bwd(const moek_ctx *ctx, const float *dgates, const float *scores,
                                     const int32_t *idx, float *dscores, int64_t N, int64_t E,
                                     int64_t k, int64_t renorm, float scale)
{
    if (!rt_rows_ok(ctx, N, E) || !kc_shape(ctx, k >= 0) || N * E == 0)
        return;
    k_topk_biased_bwd<<<kc_blocks(N), KCUDA_THREADS, 0, kc_stream(ctx)>>>(
        dgates, scores, idx, dscores, N, E, k, renorm, scale, kc_dev_status(ctx));
    kc_launched(ctx);
}

__global__ void k_topk_grouped_fwd(const float *scores, const float *bias, int32_t *idx,
                                   float *gates, int64_t N, int64_t E, int64_t k, int64_t groups,
                                   int64_t topk_groups, int64_t renorm, float scale)
{
    int64_t gsize = E / groups;
    KC_GRID_STRIDE(n, N) {
        const float *s = scores + n * E;
        float gs[RT_MAX_E];
        uint8_t keep[RT_MAX_E];
        for (int64_t g = 0; g < groups; g++) {
            float t1 = -INFINITY, t2 = -INFINITY;
            for (int64_t e = g * gsize; e < (g + 1) * gsize; e++) {
                float v = rt_key(bias ? __fadd_rn(s[e], bias[e]) : s[e]);
                if (v > t1) {
                    t2 = t1;
                    t1 = v;
                } else if (v > t2) {
                    t2 = v;
                }
            }
            gs[g] = rt_key(gsize == 1 ? t1 : __fadd_rn(t1, t2));
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

extern "C" void moek_topk_grouped_fwd(const moek_ctx *ctx, const float *scores, const float *bias,
                                      int32_t *idx, float *gates, int64_t N, int64_t E, int64_t k,
                                      int64_t groups, int64_t topk_groups, int64_t renorm,
                                      float scale)
{
    if (!rt_rows_ok(ctx, N, E) ||
        !kc_shape(ctx, E > 0 && E <= RT_MAX_E && groups > 0 && E % groups == 0 &&
                           topk_groups >= 1 && topk_groups <= groups && k >= 0 &&
                           k <= topk_groups * (E / groups)) ||
        N == 0)
        return;
    k_topk_grouped_fwd<<<kc_blocks(N), KCUDA_THREADS, 0, kc_stream(ctx)>>>(
        scores, bias, idx, gates, N, E, k, groups, topk_groups, renorm, scale);
    kc_launched(ctx);
}

/* ---- top-k then softmax --------------------------------------------------- */
__global__ void k_topk_softmax_fwd(const float *logits, int32_t *idx, float *gates, int64_t N,
                                   int64_t E, int64_t k)
{
    KC_GRID_STRIDE(n, N) {
        const float *x = logits + n * E;
        int32_t *ir = idx + n * k;
        float *gr = gates + n * k;
        rt_select(x, nullptr, nullptr, 1, ir, E, k);
        float m = x[ir[0]];
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

extern "C" void moek_topk_softmax_fwd(const moek_ctx *ctx, const float *logits, int32_t *idx,
                                      float *gates, int64_t N, int64_t E, int64_t k)
{
    if (!rt_rows_ok(ctx, N, E) || !kc_shape(ctx, k >= 0 && k <= E) || N == 0 || k == 0)
        return;
    k_topk_softmax_fwd<<<kc_blocks(N), KCUDA_THREADS, 0, kc_stream(ctx)>>>(logits, idx, gates, N,
                                                                           E, k);
    kc_launched(ctx);
}

__global__ void k_topk_softmax_bwd(const float *dgates, const float *gates, const int32_t *idx,
                                   float *dlogits, int64_t N, int64_t E, int64_t k, int *st)
{
    KC_GRID_STRIDE(n, N) {
        const float *dg = dgates + n * k, *g = gates + n * k;
        const int32_t *ir = idx + n * k;
        float *dl = dlogits + n * E;
        for (int64_t i = 0; i < E; i++)
            dl[i] = 0.0f;
        bool bad = false;
        for (int64_t j = 0; j < k; j++)
            bad |= ir[j] < 0 || ir[j] >= E;
        if (bad) {
            kc_dev_fail(st, MOEK_E_INDEX);
            continue;
        }
        double dot = 0.0;
        for (int64_t j = 0; j < k; j++)
            dot += (double)dg[j] * g[j];
        for (int64_t j = 0; j < k; j++)
            dl[ir[j]] += g[j] * (float)((double)dg[j] - dot);
    }
}

extern "C" void moek_topk_softmax_bwd(const moek_ctx *ctx, const float *dgates, const float *gates,
                                      const int32_t *idx, float *dlogits, int64_t N, int64_t E,
                                      int64_t k)
{
    if (!rt_rows_ok(ctx, N, E) || !kc_shape(ctx, k >= 0) || N * E == 0)
        return;
    k_topk_softmax_bwd<<<kc_blocks(N), KCUDA_THREADS, 0, kc_stream(ctx)>>>(
        dgates, gates, idx, dlogits, N, E, k, kc_dev_status(ctx));
    kc_launched(ctx);
}

/* ---- router jitter: the CPU's hash, every float operation rounded alone
 * (__fmul_rn/__fadd_rn are never fused into an FMA), so the bits agree */
__device__ inline uint64_t rt_mix(uint64_t z)
{
    z ^= z >> 30;
    z *= 0xbf58476d1ce4e5b9ull;
    z ^= z >> 27;
    z *= 0x94d049bb133111ebull;
    z ^= z >> 31;
    return z;
}

__global__ void k_jitter(const float *x, float *y, int64_t n, float lo, float width,
                         const float *hyper, int64_t seed)
{
    int64_t step = hyper ? (int64_t)hyper[MOEK_HYPER_STEP] : 0;
    uint64_t st = rt_mix((uint64_t)seed ^ rt_mix((uint64_t)step + 0x9e3779b97f4a7c15ull));
    KC_GRID_STRIDE(i, n) {
        float r = __fmul_rn((float)(rt_mix(st + (uint64_t)i) >> 40), 1.0f / 16777216.0f);
        float u = __fadd_rn(lo, __fmul_rn(width, r));
        y[i] = __fmul_rn(x[i], u);
    }
}

extern "C" void moek_jitter_fwd(const moek_ctx *ctx, const float *x, float *y, int64_t n, float eps,
                                const float *hyper, int64_t seed)
{
    if (!kc_shape(ctx, n >= 0) || n == 0)
        return;
    float lo = 1.0f - eps, width = 2.0f * eps;
    k_jitter<<<kc_blocks(n), KCUDA_THREADS, 0, kc_stream(ctx)>>>(x, y, n, lo, width, hyper, seed);
    kc_launched(ctx);
}

extern "C" void moek_jitter_bwd(const moek_ctx *ctx, const float *dy, float *dx, int64_t n, float eps,
                                const float *hyper, int64_t seed)
{
    moek_jitter_fwd(ctx, dy, dx, n, eps, hyper, seed);
}

/* ---- sequence-wise balance loss: one block, a thread per expert, the
 * sequences in order, so the sum is the same every run */
__global__ void k_seq_balance_fwd(const float *probs, const int32_t *idx, float *loss, int64_t B,
                                  int64_t T, int64_t E, int64_t k, int *st)
{
    __shared__ double dshm[32];
    int64_t e = threadIdx.x;
    double total = 0.0;
    for (int64_t b = 0; b < B; b++) {
        double term = 0.0;
        if (e < E) {
            int64_t cnt = 0;
            for (int64_t s = b * T * k; s < (b + 1) * T * k; s++) {
                int32_t v = idx[s];
                if (e == 0 && (v < 0 || v >= E))
                    kc_dev_fail(st, MOEK_E_INDEX);
                cnt += v == e;
            }
            if (cnt) {
                double col = 0.0;
                for (int64_t t = b * T; t < (b + 1) * T; t++)
                    col += probs[t * E + e];
                term = (double)cnt * col;
            }
        }
        double acc = kc_block_sum_d(term, dshm);
        total += (double)E * acc / ((double)T * (double)T * (double)k);
    }
    if (threadIdx.x == 0)
        loss[0] = (float)(total / (double)B);
}

extern "C" void moek_seq_balance_loss_fwd(const moek_ctx *ctx, const float *probs,
                                          const int32_t *idx, float *loss, int64_t B, int64_t T,
                                          int64_t E, int64_t k)
{
    if (!kc_shape(ctx, B >= 0 && T >= 0 && k >= 0 && E >= 0 && E <= RT_MAX_E))
        return;
    if (B == 0 || T == 0 || k == 0 || E == 0) {
        kc_zero(ctx, loss, sizeof(float));
        return;
    }
    k_seq_balance_fwd<<<1, RT_MAX_E, 0, kc_stream(ctx)>>>(probs, idx, loss, B, T, E, k,
                                                          kc_dev_status(ctx));
    kc_launched(ctx);
}

/* a block per sequence: its counts in shared memory, then its T x E rows */
__global__ void k_seq_balance_bwd(const float *dloss, const int32_t *idx, float *dprobs, int64_t B,
                                  int64_t T, int64_t E, int64_t k, int *st)
{
    __shared__ int cnt[RT_MAX_E];
    int64_t b = blockIdx.x;
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x)
        cnt[e] = 0;
    __syncthreads();
    for (int64_t s = b * T * k + threadIdx.x; s < (b + 1) * T * k; s += blockDim.x) {
        int32_t v = idx[s];
        if (v < 0 || v >= E)
            kc_dev_fail(st, MOEK_E_INDEX);
        else
            atomicAdd(&cnt[v], 1);
    }
    __syncthreads();
    double c = (double)dloss[0] * (double)E / ((double)B * (double)T * (double)T * (double)k);
    float *d = dprobs + b * T * E;
    for (int64_t i = threadIdx.x; i < T * E; i += blockDim.x)
        d[i] = (float)((double)cnt[i % E] * c);
}

extern "C" void moek_seq_balance_loss_bwd(const moek_ctx *ctx, const float *dloss,
                                          const float *probs, const int32_t *idx, float *dprobs,
                                          int64_t B, int64_t T, int64_t E, int64_t k)
{
    (void)probs;
    if (!kc_shape(ctx, B >= 0 && T >= 0 && k >= 0 && E >= 0 && E <= RT_MAX_E && B <= INT32_MAX))
        return;
    if (B * T * E == 0)
        return;
    if (k == 0) {
        kc_zero(ctx, dprobs, B * T * E * (int64_t)sizeof(float));
        return;
    }
    k_seq_balance_bwd<<<(unsigned)B, KCUDA_THREADS, 0, kc_stream(ctx)>>>(dloss, idx, dprobs, B, T,
                                                                         E, k, kc_dev_status(ctx));
    kc_launched(ctx);
}

/* ---- expert load: integer counts in shared memory (exact, order-free) --- */
__global__ void k_expert_load(const int32_t *idx, const int32_t *slot_row, float *load, int64_t S,
                              int64_t E, int *st)
{
    extern __shared__ int el_cnt[];
    for (int64_t e = threadIdx.x; e <= E; e += blockDim.x)
        el_cnt[e] = 0;
    __syncthreads();
    for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
        int32_t v = idx[s];
        if (v < 0 || v >= E)
            kc_dev_fail(st, MOEK_E_INDEX);
        else
            atomicAdd(&el_cnt[v], 1);
        if (slot_row && slot_row[s] == -1)
            atomicAdd(&el_cnt[E], 1);
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e <= E; e += blockDim.x)
        load[e] = (float)el_cnt[e];
}

extern "C" void moek_expert_load(const moek_ctx *ctx, const int32_t *idx, const int32_t *slot_row,
                                 float *load, int64_t N, int64_t E, int64_t k)
{
    if (!kc_shape(ctx, N >= 0 && E >= 0 && k >= 0 && (E + 1) * (int64_t)sizeof(int) <= 40 * 1024 &&
                           N * k <= INT32_MAX))
        return;
    k_expert_load<<<1, 1024, (size_t)(E + 1) * sizeof(int), kc_stream(ctx)>>>(
        idx, slot_row, load, N * k, E, kc_dev_status(ctx));
    kc_launched(ctx);
}

__global__ void k_bias_update(float *bias, const float *load, int64_t E, float rate)
{
    __shared__ double dshm[32];
    double part = 0.0;
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x)
        part += load[e];
    double mean = kc_block_sum_d(part, dshm) / (double)E;
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
        double d = mean - (double)load[e];
        bias[e] += d > 0.0 ? rate : d < 0.0 ? -rate : 0.0f;
    }
}

extern "C" void moek_router_bias_update(const moek_ctx *ctx, float *bias, const float *load,
                                        int64_t E, float rate)
{
    if (!kc_shape(ctx, E >= 0) || E == 0)
        return;
    k_bias_update<<<1, 1024, 0, kc_stream(ctx)>>>(bias, load, E, rate);
    kc_launched(ctx);
}

/* ---- capacity dropping by score ------------------------------------------
 * 1. a thread per expert counts its slots;  2. a thread per slot ranks it
 * among its expert's slots (gate descending, slot ascending) when the expert
 * is over capacity: kept (-2) when fewer than C are ahead, else dropped (-1);
 * 3. a thread per expert hands out rows to its kept slots in slot order;
 * 4. rows are copied into the zeroed xs.  Step 2 is O(S x count) at worst:
 * fine at the sizes this version targets, like moe.cu's one-block plan. */
__global__ void k_dbs_count(const int32_t *idx, int32_t *expert_rows, int64_t S, int64_t E,
                            int64_t C)
{
    KC_GRID_STRIDE(e, E) {
        int64_t cnt = 0;
        for (int64_t s = 0; s < S; s++)
            cnt += idx[s] == e;
        expert_rows[2 * e] = (int32_t)(e * C);
        expert_rows[2 * e + 1] = (int32_t)(cnt < INT32_MAX ? cnt : INT32_MAX);
    }
}

__global__ void k_dbs_rank(const int32_t *idx, const float *gates, const int32_t *expert_rows,
                           int32_t *slot_row, int64_t S, int64_t E, int64_t C, int *st)
{
    KC_GRID_STRIDE(s, S) {
        int64_t e = idx[s];
        if (e < 0 || e >= E) {
            kc_dev_fail(st, MOEK_E_INDEX);
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
}

__global__ void k_dbs_rows(const int32_t *idx, int32_t *slot_row, int32_t *expert_rows, int64_t S,
                           int64_t E, int64_t C)
{
    KC_GRID_STRIDE(e, E) {
        int64_t used = 0;
        for (int64_t s = 0; s < S; s++)
            if (idx[s] == e && slot_row[s] == -2)
                slot_row[s] = (int32_t)(e * C + used++);
        expert_rows[2 * e + 1] = (int32_t)used;
    }
}

__global__ void k_dbs_scatter(const float *x, const int32_t *slot_row, float *xs, int64_t S,
                              int64_t D, int64_t k)
{
    KC_GRID_STRIDE(i, S * D) {
        int64_t s = i / D, d = i % D, r = slot_row[s];
        if (r >= 0)
            xs[r * D + d] = x[(s / k) * D + d];
    }
}

extern "C" void moek_dispatch_by_score_fwd(const moek_ctx *ctx, const float *x, const int32_t *idx,
                                           const float *gates, float *xs, int32_t *slot_row,
                                           int32_t *expert_rows, int64_t N, int64_t D, int64_t E,
                                           int64_t k, int64_t C)
{
    if (!kc_shape(ctx, C > 0 && N >= 0 && D >= 0 && E >= 0 && k >= 0))
        return;
    int64_t S = N * k, R = E * C;
    if (!kc_shape(ctx, R <= INT32_MAX && S <= INT32_MAX))
        return;
    if (!kc_zero(ctx, xs, R * D * (int64_t)sizeof(float)))
        return;
    cudaStream_t st = kc_stream(ctx);
    if (E > 0) {
        k_dbs_count<<<kc_blocks(E, 64), 64, 0, st>>>(idx, expert_rows, S, E, C);
        if (!kc_launched(ctx))
            return;
    }
    if (S > 0) {
        k_dbs_rank<<<kc_blocks(S), KCUDA_THREADS, 0, st>>>(idx, gates, expert_rows, slot_row, S, E,
                                                           C, kc_dev_status(ctx));
        if (!kc_launched(ctx))
            return;
    }
    if (E > 0) {
        k_dbs_rows<<<kc_blocks(E, 64), 64, 0, st>>>(idx, slot_row, expert_rows, S, E, C);
        if (!kc_launched(ctx))
            return;
    }
    if (S * D > 0) {
        k_dbs_scatter<<<kc_blocks(S * D), KCUDA_THREADS, 0, st>>>(x, slot_row, xs, S, D, k);
        kc_launched(ctx);
    }
}
