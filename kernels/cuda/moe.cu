/* moe.cu - dispatch (tokens stably sorted into per-expert row blocks) and
 * combine; twin of kernels/cpu/moe.c.
 *
 * Dispatch is two kernels and no host sync:
 *  1. one block plans the whole batch: a thread per expert walks the slots
 *     in (token, choice) order, staged through shared memory a chunk at a
 *     time, and counts; thread 0 turns the counts into block offsets; the
 *     same walk again hands out rows in slot order, so the order is the
 *     CPU's exactly (a stable counting sort), drops included.
 *  2. a scatter copies each kept token row into its slot row; xs is zeroed
 *     first so unused rows read as zero.
 * The plan is O(E x N k) work on one SM, small next to the expert GEMMs at
 * the sizes this version targets; the GPU performance issue replaces it
 * with a per-warp ballot scan. */
#include "kcuda.cuh"

#define DP_THREADS 1024

__global__ void k_dispatch_plan(const int32_t *idx, int32_t *slot_row, int32_t *expert_rows,
                                int64_t S, int64_t E, int64_t C, int *st)
{
    __shared__ int32_t chunk[DP_THREADS];
    int tid = threadIdx.x;
    /* bad ids are reported and dropped */
    for (int64_t s = tid; s < S; s += DP_THREADS)
        if (idx[s] < 0 || idx[s] >= E) {
            kc_dev_fail(st, MOEK_E_INDEX);
            slot_row[s] = -1;
        }
    /* pass 1: counts */
    for (int64_t e0 = 0; e0 < E; e0 += DP_THREADS) {
        int64_t e = e0 + tid, cnt = 0;
        for (int64_t c0 = 0; c0 < S; c0 += DP_THREADS) {
            int64_t s = c0 + tid;
            chunk[tid] = s < S ? idx[s] : -1;
            __syncthreads();
            int64_t n = S - c0 < DP_THREADS ? S - c0 : DP_THREADS;
            if (e < E)
                for (int64_t i = 0; i < n; i++)
                    cnt += chunk[i] == e;
            __syncthreads();
        }
        if (e < E)
            expert_rows[2 * e + 1] = (int32_t)cnt;
    }
    __syncthreads();
    /* block offsets */
    if (tid == 0) {
        int64_t next = 0;
        for (int64_t e = 0; e < E; e++) {
            expert_rows[2 * e] = (int32_t)(C > 0 ? e * C : next);
            next += expert_rows[2 * e + 1];
        }
    }
    __syncthreads();
    /* pass 2: rows in slot order; over capacity -> dropped */
    for (int64_t e0 = 0; e0 < E; e0 += DP_THREADS) {
        int64_t e = e0 + tid, used = 0, first = e < E ? expert_rows[2 * e] : 0;
        for (int64_t c0 = 0; c0 < S; c0 += DP_THREADS) {
            int64_t s = c0 + tid;
            chunk[tid] = s < S ? idx[s] : -1;
            __syncthreads();
            int64_t n = S - c0 < DP_THREADS ? S - c0 : DP_THREADS;
            if (e < E)
                for (int64_t i = 0; i < n; i++) {
                    if (chunk[i] != e)
                        continue;
                    if (C > 0 && used >= C) {
                        slot_row[c0 + i] = -1;
                    } else {
                        slot_row[c0 + i] = (int32_t)(first + used);
                        used++;
                    }
                }
            __syncthreads();
        }
        if (e < E)
            expert_rows[2 * e + 1] = (int32_t)used;
    }
}

template <typename T>
__global__ void k_dispatch_scatter(const T *x, const int32_t *slot_row, T *xs, int64_t S,
                                   int64_t D, int64_t k)
{
    KC_GRID_STRIDE(i, S * D) {
        int64_t s = i / D, d = i % D, r = slot_row[s];
        if (r >= 0)
            xs[r * D + d] = x[(s / k) * D + d];
    }
}

template <typename T>
static void kc_dispatch_fwd(const moek_ctx *ctx, const T *x, const int32_t *idx, T *xs,
                            int32_t *slot_row, int32_t *expert_rows, int64_t N, int64_t D,
                            int64_t E, int64_t k, int64_t C)
{
    if (!kc_shape(ctx, C >= 0 && N >= 0 && D >= 0 && E >= 0 && k >= 0))
        return;
    int64_t S = N * k, R = C > 0 ? E * C : S;
    if (!kc_shape(ctx, R <= INT32_MAX && S <= INT32_MAX))
        return;
    if (!kc_zero(ctx, xs, R * D * (int64_t)sizeof(T)))
        return;
    if (E > 0 || S > 0) {
        k_dispatch_plan<<<1, DP_THREADS, 0, kc_stream(ctx)>>>(idx, slot_row, expert_rows, S, E, C,
                                                              kc_dev_status(ctx));
        if (!kc_launched(ctx))
            return;
    }
    if (S * D > 0) {
        k_dispatch_scatter<T><<<kc_blocks(S * D), KCUDA_THREADS, 0, kc_stream(ctx)>>>(
            x, slot_row, xs, S, D, k);
        kc_launched(ctx);
    }
}

/* dx[t] = sum_j dxs[slot_row[t,j]] over kept slots; a thread per (t, d) */
template <typename T>
__global__ void k_dispatch_bwd(const T *dxs, const int32_t *slot_row, T *dx, int64_t N, int64_t D,
                               int64_t k, int64_t R, int *st)
{
    KC_GRID_STRIDE(i, N * D) {
        int64_t t = i / D, d = i % D;
        float acc = 0.0f;
        for (int64_t j = 0; j < k; j++) {
            int64_t r = slot_row[t * k + j];
            if (r < 0)
                continue;
            if (r >= R) {
                if (d == 0)
                    kc_dev_fail(st, MOEK_E_INDEX);
                continue;
            }
            acc += kc_ld(dxs + r * D + d);
        }
        kc_st(dx + i, acc);
    }
}

template <typename T>
static void kc_dispatch_bwd(const moek_ctx *ctx, const T *dxs, const int32_t *slot_row, T *dx,
                            int64_t N, int64_t D, int64_t k, int64_t R)
{
    if (!kc_shape(ctx, N >= 0 && D >= 0 && k >= 0 && R >= 0) || N * D == 0)
        return;
    k_dispatch_bwd<T><<<kc_blocks(N * D), KCUDA_THREADS, 0, kc_stream(ctx)>>>(
        dxs, slot_row, dx, N, D, k, R, kc_dev_status(ctx));
    kc_launched(ctx);
}

/* out[t] = sum_j gates[t,j] ys[slot_row[t,j]]; a thread per (t, d) */
template <typename T>
__global__ void k_combine_fwd(const T *ys, const int32_t *slot_row, const float *gates, T *out,
                              int64_t N, int64_t D, int64_t k, int64_t R, int *st)
{
    KC_GRID_STRIDE(i, N * D) {
        int64_t t = i / D, d = i % D;
        float acc = 0.0f;
        for (int64_t j = 0; j < k; j++) {
            int64_t r = slot_row[t * k + j];
            if (r < 0)
                continue;
            if (r >= R) {
                if (d == 0)
                    kc_dev_fail(st, MOEK_E_INDEX);
                continue;
            }
            acc += gates[t * k + j] * kc_ld(ys + r * D + d);
        }
        kc_st(out + i, acc);
    }
}

template <typename T>
static void kc_combine_fwd(const moek_ctx *ctx, const T *ys, const int32_t *slot_row,
                           const float *gates, T *out, int64_t N, int64_t D, int64_t k, int64_t R)
{
    if (!kc_shape(ctx, N >= 0 && D >= 0 && k >= 0 && R >= 0) || N * D == 0)
        return;
    k_combine_fwd<T><<<kc_blocks(N * D), KCUDA_THREADS, 0, kc_stream(ctx)>>>(
        ys, slot_row, gates, out, N, D, k, R, kc_dev_status(ctx));
    kc_launched(ctx);
}

/* dys[slot_row[t,j]] = gates[t,j] dout[t]; dispatch gives each row to at
 * most one slot, so the writes never collide */
template <typename T>
__global__ void k_combine_bwd_dys(const T *dout, const int32_t *slot_row, const float *gates,
                                  T *dys, int64_t S, int64_t D, int64_t k, int64_t R)
{
    KC_GRID_STRIDE(i, S * D) {
        int64_t s = i / D, d = i % D, r = slot_row[s];
        if (r >= 0 && r < R)
            kc_st(dys + r * D + d, gates[s] * kc_ld(dout + (s / k) * D + d));
    }
}

/* dgates[t,j] = dout[t] . ys[slot_row[t,j]] in double; a warp per slot */
template <typename T>
__global__ void k_combine_bwd_dgates(const T *dout, const T *ys, const int32_t *slot_row,
                                     float *dgates, int64_t S, int64_t D, int64_t k, int64_t R,
                                     int *st)
{
    int lane = threadIdx.x & 31;
    int64_t s = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (s >= S)
        return;
    int64_t r = slot_row[s];
    if (r < 0 || r >= R) {
        if (lane == 0) {
            if (r >= R)
                kc_dev_fail(st, MOEK_E_INDEX);
            dgates[s] = 0.0f;
        }
        return;
    }
    const T *d = dout + (s / k) * D, *y = ys + r * D;
    double acc = 0.0;
    for (int64_t i = lane; i < D; i += 32)
        acc += (double)kc_ld(d + i) * kc_ld(y + i);
    acc = kc_warp_sum_d(acc);
    if (lane == 0)
        dgates[s] = (float)acc;
}

template <typename T>
static void kc_combine_bwd(const moek_ctx *ctx, const T *dout, const T *ys, const int32_t *slot_row,
                           const float *gates, T *dys, float *dgates, int64_t N, int64_t D,
                           int64_t k, int64_t R)
{
    if (!kc_shape(ctx, N >= 0 && D >= 0 && k >= 0 && R >= 0 && N * k <= ((int64_t)1 << 36)))
        return;
    int64_t S = N * k;
    if (dys) {
        if (!kc_zero(ctx, dys, R * D * (int64_t)sizeof(T)))
            return;
        if (S * D > 0) {
            k_combine_bwd_dys<T><<<kc_blocks(S * D), KCUDA_THREADS, 0, kc_stream(ctx)>>>(
                dout, slot_row, gates, dys, S, D, k, R);
            if (!kc_launched(ctx))
                return;
        }
    }
    if (dgates && S > 0) {
        unsigned blocks = (unsigned)((S * 32 + KCUDA_THREADS - 1) / KCUDA_THREADS);
        k_combine_bwd_dgates<T><<<blocks, KCUDA_THREADS, 0, kc_stream(ctx)>>>(
            dout, ys, slot_row, dgates, S, D, k, R, kc_dev_status(ctx));
        kc_launched(ctx);
    }
}

extern "C" {

void moek_dispatch_fwd(const moek_ctx *ctx, const float *x, const int32_t *idx, float *xs,
                       int32_t *slot_row, int32_t *expert_rows, int64_t N, int64_t D, int64_t E,
                       int64_t k, int64_t C)
{
    kc_dispatch_fwd(ctx, x, idx, xs, slot_row, expert_rows, N, D, E, k, C);
}

void moek_dispatch_bwd(const moek_ctx *ctx, const float *dxs, const int32_t *slot_row, float *dx,
                       int64_t N, int64_t D, int64_t k, int64_t R)
{
    kc_dispatch_bwd(ctx, dxs, slot_row, dx, N, D, k, R);
}

void moek_combine_fwd(const moek_ctx *ctx, const float *ys, const int32_t *slot_row,
                      const float *gates, float *out, int64_t N, int64_t D, int64_t k, int64_t R)
{
    kc_combine_fwd(ctx, ys, slot_row, gates, out, N, D, k, R);
}

void moek_combine_bwd(const moek_ctx *ctx, const float *dout, const float *ys,
                      const int32_t *slot_row, const float *gates, float *dys, float *dgates,
                      int64_t N, int64_t D, int64_t k, int64_t R)
{
    kc_combine_bwd(ctx, dout, ys, slot_row, gates, dys, dgates, N, D, k, R);
}

/* bf16 rows; gates and dgates stay fp32, sums over slots are fp32 */
void moek_dispatch_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *x, const int32_t *idx,
                            moek_bf16 *xs, int32_t *slot_row, int32_t *expert_rows, int64_t N,
                            int64_t D, int64_t E, int64_t k, int64_t C)
{
    kc_dispatch_fwd(ctx, kc_bf(x), idx, kc_bf(xs), slot_row, expert_rows, N, D, E, k, C);
}

void moek_dispatch_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dxs, const int32_t *slot_row,
                            moek_bf16 *dx, int64_t N, int64_t D, int64_t k, int64_t R)
{
    kc_dispatch_bwd(ctx, kc_bf(dxs), slot_row, kc_bf(dx), N, D, k, R);
}

void moek_combine_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *ys, const int32_t *slot_row,
                           const float *gates, moek_bf16 *out, int64_t N, int64_t D, int64_t k,
                           int64_t R)
{
    kc_combine_fwd(ctx, kc_bf(ys), slot_row, gates, kc_bf(out), N, D, k, R);
}

void moek_combine_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dout, const moek_bf16 *ys,
                           const int32_t *slot_row, const float *gates, moek_bf16 *dys,
                           float *dgates, int64_t N, int64_t D, int64_t k, int64_t R)
{
    kc_combine_bwd(ctx, kc_bf(dout), kc_bf(ys), slot_row, gates, kc_bf(dys), dgates, N, D, k, R);
}


/* ---- fp16 storage: the bf16 exports above instantiated with __half ---- */
void moek_dispatch_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, const int32_t *idx,
                            moek_f16 *xs, int32_t *slot_row, int32_t *expert_rows, int64_t N,
                            int64_t D, int64_t E, int64_t k, int64_t C)
{
    kc_dispatch_fwd(ctx, kc_hf(x), idx, kc_hf(xs), slot_row, expert_rows, N, D, E, k, C);
}

void moek_dispatch_bwd_f16(const moek_ctx *ctx, const moek_f16 *dxs, const int32_t *slot_row,
                            moek_f16 *dx, int64_t N, int64_t D, int64_t k, int64_t R)
{
    kc_dispatch_bwd(ctx, kc_hf(dxs), slot_row, kc_hf(dx), N, D, k, R);
}

void moek_combine_fwd_f16(const moek_ctx *ctx, const moek_f16 *ys, const int32_t *slot_row,
                           const float *gates, moek_f16 *out, int64_t N, int64_t D, int64_t k,
                           int64_t R)
{
    kc_combine_fwd(ctx, kc_hf(ys), slot_row, gates, kc_hf(out), N, D, k, R);
}

void moek_combine_bwd_f16(const moek_ctx *ctx, const moek_f16 *dout, const moek_f16 *ys,
                           const int32_t *slot_row, const float *gates, moek_f16 *dys,
                           float *dgates, int64_t N, int64_t D, int64_t k, int64_t R)
{
    kc_combine_bwd(ctx, kc_hf(dout), kc_hf(ys), slot_row, gates, kc_hf(dys), dgates, N, D, k, R);
}

} /* extern "C" */
