/* router.cu - router maths in fp32 always (twin of kernels/cpu/router.c):
 * softmax, top-k with ties to the lower index, the balance loss.  A warp
 * per token: router rows are a few dozen to a few hundred experts. */
#include "kcuda.cuh"

static inline unsigned rt_warp_blocks(int64_t rows)
{
    return (unsigned)((rows * 32 + KCUDA_THREADS - 1) / KCUDA_THREADS);
}

#define RT_ROW_OR_RETURN(n, N)                                                    \
    int lane = threadIdx.x & 31;                                                  \
    int64_t n = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;            \
    if (n >= (N))                                                                 \
        return;

/* logits in storage type T (fp32, or bf16 for moek_softmax_fwd_bf16); the
 * probabilities are fp32 always */
template <typename T>
__global__ void k_softmax_fwd(const T *logits, float *probs, int64_t N, int64_t E)
{
    RT_ROW_OR_RETURN(n, N);
    const T *x = logits + n * E;
    float *p = probs + n * E;
    float m = -INFINITY;
    for (int64_t i = lane; i < E; i += 32)
        m = fmaxf(m, kc_ld(x + i));
    m = kc_warp_max(m);
    double s = 0.0;
    for (int64_t i = lane; i < E; i += 32)
        s += expf(kc_ld(x + i) - m);
    float inv = (float)(1.0 / kc_warp_sum_d(s));
    for (int64_t i = lane; i < E; i += 32)
        p[i] = expf(kc_ld(x + i) - m) * inv;
}

/* fp32 probabilities and their gradient in, logit gradient out in T */
template <typename T>
__global__ void k_softmax_bwd(const float *dprobs, const float *probs, T *dlogits, int64_t N,
                              int64_t E)
{
    RT_ROW_OR_RETURN(n, N);
    const float *dp = dprobs + n * E, *p = probs + n * E;
    double dot = 0.0;
    for (int64_t i = lane; i < E; i += 32)
        dot += (double)dp[i] * p[i];
    dot = kc_warp_sum_d(dot);
    for (int64_t i = lane; i < E; i += 32)
        kc_st(dlogits + n * E + i, p[i] * (float)((double)dp[i] - dot));
}

extern "C" void moek_softmax_fwd(const moek_ctx *ctx, const float *logits, float *probs, int64_t N,
                                 int64_t E)
{
    if (!kc_shape(ctx, N >= 0 && E >= 0 && N <= ((int64_t)1 << 36)) || N * E == 0)
        return;
    k_softmax_fwd<float><<<rt_warp_blocks(N), KCUDA_THREADS, 0, kc_stream(ctx)>>>(logits, probs, N, E);
    kc_launched(ctx);
}

extern "C" void moek_softmax_bwd(const moek_ctx *ctx, const float *dprobs, const float *probs,
                                 float *dlogits, int64_t N, int64_t E)
{
    if (!kc_shape(ctx, N >= 0 && E >= 0 && N <= ((int64_t)1 << 36)) || N * E == 0)
        return;
    k_softmax_bwd<float><<<rt_warp_blocks(N), KCUDA_THREADS, 0, kc_stream(ctx)>>>(dprobs, probs, dlogits,
                                                                           N, E);
    kc_launched(ctx);
}

/* ---- top-k ---------------------------------------------------------------
 * The order is score descending, index ascending, with NaN below
 * everything; pick j is the best element behind pick j-1 in that order, so
 * no marks are needed and ties always go to the lower index. */
__device__ inline float rt_key(float s) { return isnan(s) ? -INFINITY : s; }

__device__ inline bool rt_ahead(float sa, int64_t a, float sb, int64_t b)
{
    return sa > sb || (sa == sb && a < b);
}

__global__ void k_topk_fwd(const float *scores, int32_t *idx, float *gates, int64_t N, int64_t E,
                           int64_t k, int64_t renorm)
{
    RT_ROW_OR_RETURN(n, N);
    const float *s = scores + n * E;
    float prev_s = INFINITY;
    int64_t prev_i = -1;
    double sum = 0.0;
    for (int64_t j = 0; j < k; j++) {
        int64_t best = -1;   /* -1: this lane has no candidate */
        float best_s = 0.0f;
        for (int64_t e = lane; e < E; e += 32) {
            float se = rt_key(s[e]);
            if (!rt_ahead(prev_s, prev_i, se, e))
                continue;
            if (best < 0 || rt_ahead(se, e, best_s, best)) {
                best = e;
                best_s = se;
            }
        }
        for (int o = 16; o > 0; o >>= 1) {
            int64_t ob = __shfl_xor_sync(0xffffffffu, best, o);
            float os = __shfl_xor_sync(0xffffffffu, best_s, o);
            if (ob >= 0 && (best < 0 || rt_ahead(os, ob, best_s, best))) {
                best = ob;
                best_s = os;
            }
        }
        if (lane == 0) {
            idx[n * k + j] = (int32_t)best;
            gates[n * k + j] = s[best];
        }
        sum += s[best];
        prev_s = best_s;
        prev_i = best;
    }
    __syncwarp();   /* idx written by lane 0 is read by all lanes below */
    if (renorm && sum != 0.0) {
        float inv = (float)(1.0 / sum);
        for (int64_t j = lane; j < k; j += 32)
            gates[n * k + j] = s[idx[n * k + j]] * inv;
    }
}

/* Without renorm dS_i = dg_i; with renorm (g = s/S over the k chosen)
 * dS_i = (dg_i - sum_j dg_j g_j) / S; experts not chosen get 0. */
__global__ void k_topk_bwd(const float *dgates, const float *scores, const int32_t *idx,
                           float *dscores, int64_t N, int64_t E, int64_t k, int64_t renorm, int *st)
{
    RT_ROW_OR_RETURN(n, N);
    const float *s = scores + n * E, *dg = dgates + n * k;
    const int32_t *ir = idx + n * k;
    float *ds = dscores + n * E;
    for (int64_t i = lane; i < E; i += 32)
        ds[i] = 0.0f;
    __syncwarp();   /* lane 0 adds into entries other lanes zeroed */
    if (lane != 0)
        return;
    for (int64_t j = 0; j < k; j++)
        if (ir[j] < 0 || ir[j] >= E) {
            kc_dev_fail(st, MOEK_E_INDEX);
            return;
        }
    if (!renorm) {
        for (int64_t j = 0; j < k; j++)
            ds[ir[j]] += dg[j];
        return;
    }
    double S = 0.0, dot = 0.0;
    for (int64_t j = 0; j < k; j++)
        S += s[ir[j]];
    if (S == 0.0)
        return;
    for (int64_t j = 0; j < k; j++)
        dot += (double)dg[j] * (s[ir[j]] / S);
    for (int64_t j = 0; j < k; j++)
        ds[ir[j]] += (float)(((double)dg[j] - dot) / S);
}

extern "C" void moek_topk_fwd(const moek_ctx *ctx, const float *scores, int32_t *idx, float *gates,
                              int64_t N, int64_t E, int64_t k, int64_t renorm)
{
    if (!kc_shape(ctx, k >= 0 && k <= E && N >= 0 && N <= ((int64_t)1 << 36)) || N == 0 || k == 0)
        return;
    k_topk_fwd<<<rt_warp_blocks(N), KCUDA_THREADS, 0, kc_stream(ctx)>>>(scores, idx, gates, N, E,
                                                                        k, renorm);
    kc_launched(ctx);
}

extern "C" void moek_topk_bwd(const moek_ctx *ctx, const float *dgates, const float *scores,
                              const int32_t *idx, float *dscores, int64_t N, int64_t E, int64_t k,
                              int64_t renorm)
{
    if (!kc_shape(ctx, k >= 0 && N >= 0 && E >= 0 && N <= ((int64_t)1 << 36)) || N * E == 0)
        return;
    k_topk_bwd<<<rt_warp_blocks(N), KCUDA_THREADS, 0, kc_stream(ctx)>>>(
        dgates, scores, idx, dscores, N, E, k, renorm, kc_dev_status(ctx));
    kc_launched(ctx);
}

/* ---- balance loss: E sum_i f_i P_i ---------------------------------------
 * One block: counts per expert in shared memory (integer atomics, so the
 * counts are exact and order-free), then one thread per expert sums its
 * probability column in row order. */
__global__ void k_balance_fwd(const float *probs, const int32_t *idx, float *loss, int64_t N,
                              int64_t E, int64_t k, int *st)
{
    extern __shared__ int bl_cnt[];
    __shared__ double dshm[32];
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x)
        bl_cnt[e] = 0;
    __syncthreads();
    for (int64_t s = threadIdx.x; s < N * k; s += blockDim.x) {
        int64_t e = idx[s];
        if (e < 0 || e >= E)
            kc_dev_fail(st, MOEK_E_INDEX);
        else
            atomicAdd(&bl_cnt[e], 1);
    }
    __syncthreads();
    double total = 0.0;
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
        if (!bl_cnt[e])
            continue;
        double col = 0.0;
        for (int64_t t = 0; t < N; t++)
            col += probs[t * E + e];
        total += (double)bl_cnt[e] * col;
    }
    total = kc_block_sum_d(total, dshm);
    if (threadIdx.x == 0)
        loss[0] = (N <= 0 || k <= 0) ? 0.0f
                                     : (float)((double)E * total / ((double)N * (double)N * (double)k));
}

/* dprobs[t,i] = dloss E count_i / (N N k), the same for every row */
__global__ void k_balance_bwd(const float *dloss, const int32_t *idx, float *dprobs, int64_t N,
                              int64_t E, int64_t k, int *st)
{
    extern __shared__ int bl_cnt[];
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x)
        bl_cnt[e] = 0;
    __syncthreads();
    if (blockIdx.x == 0) {
        for (int64_t s = threadIdx.x; s < N * k; s += blockDim.x) {
            int64_t e = idx[s];
            if (e < 0 || e >= E)
                kc_dev_fail(st, MOEK_E_INDEX);
        }
    }
    for (int64_t s = threadIdx.x; s < N * k; s += blockDim.x) {
        int64_t e = idx[s];
        if (e >= 0 && e < E)
            atomicAdd(&bl_cnt[e], 1);
    }
    __syncthreads();
    double c = k > 0 ? (double)dloss[0] * (double)E / ((double)N * (double)N * (double)k) : 0.0;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < N * E;
         i += (int64_t)gridDim.x * blockDim.x)
        dprobs[i] = (float)((double)(float)bl_cnt[i % E] * c);
}

static bool bl_shm_ok(const moek_ctx *ctx, int64_t E)
{
    return kc_shape(ctx, E >= 0 && E * (int64_t)sizeof(int) <= 40 * 1024);
}

extern "C" void moek_balance_loss_fwd(const moek_ctx *ctx, const float *probs, const int32_t *idx,
                                      float *loss, int64_t N, int64_t E, int64_t k)
{
    if (!kc_shape(ctx, N >= 0 && k >= 0) || !bl_shm_ok(ctx, E))
        return;
    k_balance_fwd<<<1, 1024, (size_t)E * sizeof(int), kc_stream(ctx)>>>(probs, idx, loss, N, E, k,
                                                                       kc_dev_status(ctx));
    kc_launched(ctx);
}

extern "C" void moek_balance_loss_bwd(const moek_ctx *ctx, const float *dloss, const float *probs,
                                      const int32_t *idx, float *dprobs, int64_t N, int64_t E,
                                      int64_t k)
{
    (void)probs;
    if (!kc_shape(ctx, N >= 0 && k >= 0) || !bl_shm_ok(ctx, E) || N <= 0 || E <= 0)
        return;
    /* each block recounts (N k is small next to N E); few blocks */
    unsigned blocks = kc_blocks(N * E, 1024);
    if (blocks > 32)
        blocks = 32;
    k_balance_bwd<<<blocks, 1024, (size_t)E * sizeof(int), kc_stream(ctx)>>>(dloss, idx, dprobs, N,
                                                                             E, k, kc_dev_status(ctx));
    kc_launched(ctx);
}

/* ---- bf16: the router reads bf16 logits and writes bf16 logit gradients;
 * probabilities and everything after them stay fp32 */
extern "C" void moek_softmax_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *logits, float *probs,
                                      int64_t N, int64_t E)
{
    if (!kc_shape(ctx, N >= 0 && E >= 0 && N <= ((int64_t)1 << 36)) || N * E == 0)
        return;
    k_softmax_fwd<kc_bf16><<<rt_warp_blocks(N), KCUDA_THREADS, 0, kc_stream(ctx)>>>(kc_bf(logits),
                                                                                    probs, N, E);
    kc_launched(ctx);
}

extern "C" void moek_softmax_bwd_bf16(const moek_ctx *ctx, const float *dprobs, const float *probs,
                                      moek_bf16 *dlogits, int64_t N, int64_t E)
{
    if (!kc_shape(ctx, N >= 0 && E >= 0 && N <= ((int64_t)1 << 36)) || N * E == 0)
        return;
    k_softmax_bwd<kc_bf16><<<rt_warp_blocks(N), KCUDA_THREADS, 0, kc_stream(ctx)>>>(
        dprobs, probs, kc_bf(dlogits), N, E);
    kc_launched(ctx);
}

/* ---- fp16 storage: the bf16 exports above instantiated with __half ---- */
extern "C" void moek_softmax_fwd_f16(const moek_ctx *ctx, const moek_f16 *logits, float *probs,
                                      int64_t N, int64_t E)
{
    if (!kc_shape(ctx, N >= 0 && E >= 0 && N <= ((int64_t)1 << 36)) || N * E == 0)
        return;
    k_softmax_fwd<kc_f16><<<rt_warp_blocks(N), KCUDA_THREADS, 0, kc_stream(ctx)>>>(kc_hf(logits),
                                                                                    probs, N, E);
    kc_launched(ctx);
}

extern "C" void moek_softmax_bwd_f16(const moek_ctx *ctx, const float *dprobs, const float *probs,
                                      moek_f16 *dlogits, int64_t N, int64_t E)
{
    if (!kc_shape(ctx, N >= 0 && E >= 0 && N <= ((int64_t)1 << 36)) || N * E == 0)
        return;
    k_softmax_bwd<kc_f16><<<rt_warp_blocks(N), KCUDA_THREADS, 0, kc_stream(ctx)>>>(
        dprobs, probs, kc_hf(dlogits), N, E);
    kc_launched(ctx);
}
