/* loss.cu - cross-entropy (twin of kernels/cpu/loss.c), the router z-loss
 * and the global-norm sum of squares: the ops that end in one number.
 *
 * Every scalar is reduced in a fixed order (per-thread double partials, a
 * fixed grid, then one block over the partials), never with atomics, so a
 * replayed step gives bit-identical losses. */
#include "kcuda.cuh"

/* log-sum-exp of a row, computed by a whole block: max in fp32, the sum of
 * exp((double)(x - max)) in double, as on the CPU */
template <typename T> __device__ double ls_block_lse(const T *x, int64_t n, float *fshm, double *dshm)
{
    float m = -INFINITY;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
        m = fmaxf(m, kc_ld(x + i));
    m = kc_block_max(m, fshm);
    if (m == -INFINITY)
        return -INFINITY;
    double s = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
        s += exp((double)(kc_ld(x + i) - m));
    s = kc_block_sum_d(s, dshm);
    return (double)m + log(s);
}

/* the same by one warp (router rows are short) */
template <typename T> __device__ double ls_warp_lse(const T *x, int64_t n)
{
    int lane = threadIdx.x & 31;
    float m = -INFINITY;
    for (int64_t i = lane; i < n; i += 32)
        m = fmaxf(m, kc_ld(x + i));
    m = kc_warp_max(m);
    if (m == -INFINITY)
        return -INFINITY;
    double s = 0.0;
    for (int64_t i = lane; i < n; i += 32)
        s += exp((double)(kc_ld(x + i) - m));
    s = kc_warp_sum_d(s);
    return (double)m + log(s);
}

/* ---- cross entropy ------------------------------------------------------ */
template <typename T> __global__ void k_ce_lse(const T *logits, float *lse, int64_t V)
{
    __shared__ float fshm[32];
    __shared__ double dshm[32];
    int64_t n = blockIdx.x;
    double l = ls_block_lse(logits + n * V, V, fshm, dshm);
    if (threadIdx.x == 0)
        lse[n] = (float)l;
}

/* one block: loss = mean_n (lse_n - logits[n, y_n]); bad targets are
 * reported and left out of the sum (but not of the count), as on the CPU */
template <typename T>
__global__ void k_ce_loss(const T *logits, const int32_t *targets, const float *lse, float *loss,
                          int64_t N, int64_t V, int *st)
{
    __shared__ double dshm[32];
    double s = 0.0;
    for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
        int64_t y = targets[n];
        if (y < 0 || y >= V) {
            kc_dev_fail(st, MOEK_E_INDEX);
            continue;
        }
        s += (double)lse[n] - (double)kc_ld(logits + n * V + y);
    }
    s = kc_block_sum_d(s, dshm);
    if (threadIdx.x == 0)
        loss[0] = N > 0 ? (float)(s / (double)N) : 0.0f;
}

/* dlogits = (softmax - onehot(target)) dloss / N */
template <typename T>
__global__ void k_ce_bwd(const float *dloss, const T *logits, const int32_t *targets,
                         const float *lse, T *dlogits, int64_t N, int64_t V, int *st)
{
    float g = (float)((double)dloss[0] / (double)N);
    KC_GRID_STRIDE(i, N * V) {
        int64_t n = i / V, c = i % V, y = targets[n];
        float d = expf(kc_ld(logits + i) - lse[n]) * g;
        if (c == y)
            d -= g;
        if (c == 0 && (y < 0 || y >= V))
            kc_dev_fail(st, MOEK_E_INDEX);
        kc_st(dlogits + i, d);
    }
}

template <typename T>
static void kc_ce_fwd(const moek_ctx *ctx, const T *logits, const int32_t *targets, float *loss,
                      float *lse, int64_t N, int64_t V)
{
    if (!kc_shape(ctx, N >= 0 && V >= 0 && N <= INT32_MAX))
        return;
    if (N > 0) {
        k_ce_lse<T><<<(unsigned)N, KCUDA_THREADS, 0, kc_stream(ctx)>>>(logits, lse, V);
        if (!kc_launched(ctx))
            return;
    }
    k_ce_loss<T><<<1, 1024, 0, kc_stream(ctx)>>>(logits, targets, lse, loss, N, V,
                                                 kc_dev_status(ctx));
    kc_launched(ctx);
}

template <typename T>
static void kc_ce_bwd(const moek_ctx *ctx, const float *dloss, const T *logits,
                      const int32_t *targets, const float *lse, T *dlogits, int64_t N, int64_t V)
{
    if (!kc_shape(ctx, N >= 0 && V >= 0) || N * V == 0)
        return;
    k_ce_bwd<T><<<kc_blocks(N * V), KCUDA_THREADS, 0, kc_stream(ctx)>>>(
        dloss, logits, targets, lse, dlogits, N, V, kc_dev_status(ctx));
    kc_launched(ctx);
}

/* ---- two-pass scalar reductions ----------------------------------------
 * Pass 1: a grid of G <= KCUDA_SCRATCH blocks, G fixed by the size, writes
 * one double per block to the scratch; pass 2: one block sums them in order. */
static unsigned ls_partials(int64_t items, int per_block)
{
    int64_t g = (items + per_block - 1) / per_block;
    if (g > KCUDA_SCRATCH)
        g = KCUDA_SCRATCH;
    return (unsigned)(g < 1 ? 1 : g);
}

/* out[0] = (float)(base + scale * sum(part[0..G)));  base = out[0] when accumulate */
__global__ void k_finish(const double *part, unsigned G, float *out, double scale, int accumulate)
{
    __shared__ double dshm[32];
    double s = 0.0;
    for (unsigned i = threadIdx.x; i < G; i += blockDim.x)
        s += part[i];
    s = kc_block_sum_d(s, dshm);
    if (threadIdx.x == 0)
        out[0] = (float)((accumulate ? (double)out[0] : 0.0) + scale * s);
}

/* z-loss partials: a warp per row, lse^2 summed per warp in row order */
template <typename T> __global__ void k_zloss_part(const T *logits, double *part, int64_t N, int64_t E)
{
    __shared__ double dshm[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    double s = 0.0;
    for (int64_t n = (int64_t)blockIdx.x * nw + warp; n < N; n += (int64_t)gridDim.x * nw) {
        double l = ls_warp_lse(logits + n * E, E);
        if (lane == 0)
            s += l * l;
    }
    s = kc_block_sum_d(s, dshm);
    if (threadIdx.x == 0)
        part[blockIdx.x] = s;
}

template <typename T>
static void kc_zloss_fwd(const moek_ctx *ctx, const T *logits, float *loss, int64_t N, int64_t E)
{
    kcuda_handles *h = kc_handles(ctx);
    if (!kc_shape(ctx, N >= 0 && E >= 0))
        return;
    if (!h) {
        kc_fail(ctx, MOEK_E_DEVICE);
        return;
    }
    unsigned G = ls_partials(N, KCUDA_THREADS / 32);
    if (N > 0) {
        k_zloss_part<T><<<G, KCUDA_THREADS, 0, kc_stream(ctx)>>>(logits, h->scratch, N, E);
        if (!kc_launched(ctx))
            return;
    } else {
        G = 0;
    }
    k_finish<<<1, 1024, 0, kc_stream(ctx)>>>(h->scratch, G, loss, N > 0 ? 1.0 / (double)N : 0.0, 0);
    kc_launched(ctx);
}

/* dlogits = 2 lse softmax dloss / N, a warp per row */
template <typename T>
__global__ void k_zloss_bwd(const float *dloss, const T *logits, T *dlogits, int64_t N, int64_t E)
{
    int lane = threadIdx.x & 31;
    int64_t n = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (n >= N)
        return;
    double g = 2.0 * (double)dloss[0] / (double)N;
    const T *x = logits + n * E;
    double l = ls_warp_lse(x, E);
    for (int64_t i = lane; i < E; i += 32)
        kc_st(dlogits + n * E + i, (float)(g * l * exp((double)kc_ld(x + i) - l)));
}

template <typename T>
static void kc_zloss_bwd(const moek_ctx *ctx, const float *dloss, const T *logits, T *dlogits,
                         int64_t N, int64_t E)
{
    if (!kc_shape(ctx, N >= 0 && E >= 0 && N <= ((int64_t)1 << 36)) || N * E == 0)
        return;
    unsigned blocks = (unsigned)((N * 32 + KCUDA_THREADS - 1) / KCUDA_THREADS);
    k_zloss_bwd<T><<<blocks, KCUDA_THREADS, 0, kc_stream(ctx)>>>(dloss, logits, dlogits, N, E);
    kc_launched(ctx);
}

/* ---- sum of squares for the global gradient norm ---------------------- */
template <typename T> __global__ void k_sumsq_part(const T *x, double *part, int64_t n)
{
    __shared__ double dshm[32];
    double s = 0.0;
    KC_GRID_STRIDE(i, n) {
        double v = kc_ld(x + i);
        s += v * v;
    }
    s = kc_block_sum_d(s, dshm);
    if (threadIdx.x == 0)
        part[blockIdx.x] = s;
}

extern "C" void moek_sumsq_accum(const moek_ctx *ctx, const float *x, float *acc, int64_t n)
{
    kcuda_handles *h = kc_handles(ctx);
    if (!kc_shape(ctx, n >= 0) || n == 0)
        return;
    if (!h) {
        kc_fail(ctx, MOEK_E_DEVICE);
        return;
    }
    unsigned G = ls_partials(n, 8 * KCUDA_THREADS);
    k_sumsq_part<float><<<G, KCUDA_THREADS, 0, kc_stream(ctx)>>>(x, h->scratch, n);
    if (!kc_launched(ctx))
        return;
    k_finish<<<1, 1024, 0, kc_stream(ctx)>>>(h->scratch, G, acc, 1.0, 1);
    kc_launched(ctx);
}

extern "C" {

void moek_cross_entropy_fwd(const moek_ctx *ctx, const float *logits, const int32_t *targets,
                            float *loss, float *lse, int64_t N, int64_t V)
{
    kc_ce_fwd(ctx, logits, targets, loss, lse, N, V);
}

void moek_cross_entropy_bwd(const moek_ctx *ctx, const float *dloss, const float *logits,
                            const int32_t *targets, const float *lse, float *dlogits, int64_t N,
                            int64_t V)
{
    kc_ce_bwd(ctx, dloss, logits, targets, lse, dlogits, N, V);
}

void moek_zloss_fwd(const moek_ctx *ctx, const float *logits, float *loss, int64_t N, int64_t E)
{
    kc_zloss_fwd(ctx, logits, loss, N, E);
}

void moek_zloss_bwd(const moek_ctx *ctx, const float *dloss, const float *logits, float *dlogits,
                    int64_t N, int64_t E)
{
    kc_zloss_bwd(ctx, dloss, logits, dlogits, N, E);
}

/* bf16 logits and logit gradients; loss, lse and the seed stay fp32 */
void moek_cross_entropy_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *logits,
                                 const int32_t *targets, float *loss, float *lse, int64_t N,
                                 int64_t V)
{
    kc_ce_fwd(ctx, kc_bf(logits), targets, loss, lse, N, V);
}

void moek_cross_entropy_bwd_bf16(const moek_ctx *ctx, const float *dloss, const moek_bf16 *logits,
                                 const int32_t *targets, const float *lse, moek_bf16 *dlogits,
                                 int64_t N, int64_t V)
{
    kc_ce_bwd(ctx, dloss, kc_bf(logits), targets, lse, kc_bf(dlogits), N, V);
}

void moek_zloss_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *logits, float *loss, int64_t N,
                         int64_t E)
{
    kc_zloss_fwd(ctx, kc_bf(logits), loss, N, E);
}

void moek_zloss_bwd_bf16(const moek_ctx *ctx, const float *dloss, const moek_bf16 *logits,
                         moek_bf16 *dlogits, int64_t N, int64_t E)
{
    kc_zloss_bwd(ctx, dloss, kc_bf(logits), kc_bf(dlogits), N, E);
}


/* ---- fp16 storage: the bf16 exports above instantiated with __half ---- */
void moek_cross_entropy_fwd_f16(const moek_ctx *ctx, const moek_f16 *logits,
                                 const int32_t *targets, float *loss, float *lse, int64_t N,
                                 int64_t V)
{
    kc_ce_fwd(ctx, kc_hf(logits), targets, loss, lse, N, V);
}

void moek_cross_entropy_bwd_f16(const moek_ctx *ctx, const float *dloss, const moek_f16 *logits,
                                 const int32_t *targets, const float *lse, moek_f16 *dlogits,
                                 int64_t N, int64_t V)
{
    kc_ce_bwd(ctx, dloss, kc_hf(logits), targets, lse, kc_hf(dlogits), N, V);
}

void moek_zloss_fwd_f16(const moek_ctx *ctx, const moek_f16 *logits, float *loss, int64_t N,
                         int64_t E)
{
    kc_zloss_fwd(ctx, kc_hf(logits), loss, N, E);
}

void moek_zloss_bwd_f16(const moek_ctx *ctx, const float *dloss, const moek_f16 *logits,
                         moek_f16 *dlogits, int64_t N, int64_t E)
{
    kc_zloss_bwd(ctx, dloss, kc_hf(logits), kc_hf(dlogits), N, E);
}

} /* extern "C" */
