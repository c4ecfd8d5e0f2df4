/* norm.cu - RMSNorm, rotary position embedding and the token embedding.
 * Twins of kernels/cpu/norm.c and the embedding in elementwise.c; the norm
 * statistics are in double like the CPU's, which costs nothing here since
 * the kernel is memory-bound. */
#include "kcuda.cuh"

/* one block per row */
template <typename T>
__global__ void k_rmsnorm_fwd(const T *x, const T *w, T *y, float *rstd, int64_t D, float eps)
{
    __shared__ double shm[32];
    int64_t n = blockIdx.x;
    const T *xr = x + n * D;
    T *yr = y + n * D;
    double ss = 0.0;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        double v = kc_ld(xr + d);
        ss += v * v;
    }
    ss = kc_block_sum_d(ss, shm);
    float r = (float)(1.0 / sqrt(ss / (double)(D > 0 ? D : 1) + (double)eps));
    if (threadIdx.x == 0)
        rstd[n] = r;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
        kc_st(yr + d, kc_ld(xr + d) * r * kc_ld(w + d));
}

/* dx_j = r (w_j dy_j - x_j r^2 mean_i(dy_i w_i x_i)); one block per row */
template <typename T>
__global__ void k_rmsnorm_bwd_dx(const T *dy, const T *x, const T *w, const float *rstd, T *dx,
                                 int64_t D)
{
    __shared__ double shm[32];
    int64_t n = blockIdx.x;
    const T *xr = x + n * D, *dyr = dy + n * D;
    T *dxr = dx + n * D;
    double dot = 0.0;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
        dot += (double)kc_ld(dyr + d) * kc_ld(w + d) * kc_ld(xr + d);
    dot = kc_block_sum_d(dot, shm);
    double r = rstd[n];
    double c = r * r * dot / (double)(D > 0 ? D : 1);
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
        kc_st(dxr + d, (float)(r * ((double)kc_ld(w + d) * kc_ld(dyr + d) - kc_ld(xr + d) * c)));
}

/* dw_d = sum_n dy x r: a column sum, one thread per column over all rows in
 * order, so the result is deterministic (coalesced across the warp) */
template <typename T>
__global__ void k_rmsnorm_bwd_dw(const T *dy, const T *x, const float *rstd, T *dw, int64_t N,
                                 int64_t D)
{
    KC_GRID_STRIDE(d, D) {
        double acc = 0.0;
        for (int64_t n = 0; n < N; n++)
            acc += (double)kc_ld(dy + n * D + d) * kc_ld(x + n * D + d) * (double)rstd[n];
        kc_st(dw + d, (float)acc);
    }
}

template <typename T>
static void kc_rmsnorm_fwd(const moek_ctx *ctx, const T *x, const T *w, T *y, float *rstd, int64_t N,
                           int64_t D, float eps)
{
    if (!kc_shape(ctx, N >= 0 && D >= 0 && N <= INT32_MAX) || N == 0)
        return;
    k_rmsnorm_fwd<T><<<(unsigned)N, KCUDA_THREADS, 0, kc_stream(ctx)>>>(x, w, y, rstd, D, eps);
    kc_launched(ctx);
}

template <typename T>
static void kc_rmsnorm_bwd(const moek_ctx *ctx, const T *dy, const T *x, const T *w,
                           const float *rstd, T *dx, T *dw, int64_t N, int64_t D)
{
    if (!kc_shape(ctx, N >= 0 && D >= 0 && N <= INT32_MAX))
        return;
    if (dx && N > 0) {
        k_rmsnorm_bwd_dx<T><<<(unsigned)N, KCUDA_THREADS, 0, kc_stream(ctx)>>>(dy, x, w, rstd, dx,
                                                                               D);
        if (!kc_launched(ctx))
            return;
    }
    if (dw && D > 0) {
        k_rmsnorm_bwd_dw<T><<<kc_blocks(D, 128), 128, 0, kc_stream(ctx)>>>(dy, x, rstd, dw, N, D);
        kc_launched(ctx);
    }
}

/* ---- rope: one thread per (row, pair); the angle in double as on the CPU,
 * whose positions reach thousands of radians where fp32 would lose digits */
template <typename T>
__global__ void k_rope(const T *x, T *y, int64_t rows, int64_t T_, int64_t H, int64_t Dh,
                       float theta, double sign)
{
    int64_t half = Dh / 2, per_row = H * (half + (Dh & 1)), W = H * Dh;
    KC_GRID_STRIDE(item, rows * per_row) {
        int64_t bt = item / per_row, rem = item % per_row;
        int64_t h = rem / (half + (Dh & 1)), i = rem % (half + (Dh & 1));
        const T *xr = x + bt * W + h * Dh;
        T *yr = y + bt * W + h * Dh;
        if (i == half) {   /* odd Dh: the last element passes through */
            yr[Dh - 1] = xr[Dh - 1];
            continue;
        }
        double pos = (double)(bt % T_);
        double ang = sign * pos * pow((double)theta, -2.0 * (double)i / (double)Dh);
        float c = (float)cos(ang), s = (float)sin(ang);
        float a = kc_ld(xr + 2 * i), b = kc_ld(xr + 2 * i + 1);
        kc_st(yr + 2 * i, a * c - b * s);
        kc_st(yr + 2 * i + 1, a * s + b * c);
    }
}

template <typename S>
static void kc_rope(const moek_ctx *ctx, const S *x, S *y, int64_t B, int64_t T, int64_t H,
                    int64_t Dh, float theta, double sign)
{
    if (!kc_shape(ctx, B >= 0 && T >= 0 && H >= 0 && Dh >= 0))
        return;
    int64_t items = B * T * H * (Dh / 2 + (Dh & 1));
    if (items == 0)
        return;
    k_rope<S><<<kc_blocks(items), KCUDA_THREADS, 0, kc_stream(ctx)>>>(x, y, B * T, T, H, Dh, theta,
                                                                      sign);
    kc_launched(ctx);
}

extern "C" void moek_rope_fwd(const moek_ctx *ctx, const float *x, float *y, int64_t B, int64_t T,
                              int64_t H, int64_t Dh, float theta)
{
    kc_rope(ctx, x, y, B, T, H, Dh, theta, 1.0);
}

extern "C" void moek_rope_bwd(const moek_ctx *ctx, const float *dy, float *dx, int64_t B,
                              int64_t T, int64_t H, int64_t Dh, float theta)
{
    kc_rope(ctx, dy, dx, B, T, H, Dh, theta, -1.0);
}

/* ---- embedding -------------------------------------------------------- */
template <typename T>
__global__ void k_embedding_fwd(const int32_t *ids, const T *table, T *out, int64_t N, int64_t V,
                                int64_t D, int *st)
{
    KC_GRID_STRIDE(i, N * D) {
        int64_t t = i / D, d = i % D, id = ids[t];
        if (id < 0 || id >= V) {
            if (d == 0)
                kc_dev_fail(st, MOEK_E_INDEX);
            out[i] = (T)0.0f;
            continue;
        }
        out[i] = table[id * D + d];
    }
}

/* Deterministic without atomics: a thread owns one column d and walks the
 * tokens in order, adding into dtable[id][d] -- the CPU's order exactly.
 * Parallel over D only; the GPU performance issue replaces it with a sort. */
template <typename T>
__global__ void k_embedding_bwd(const T *dout, const int32_t *ids, T *dtable, int64_t N, int64_t V,
                                int64_t D, int *st)
{
    KC_GRID_STRIDE(d, D) {
        for (int64_t t = 0; t < N; t++) {
            int64_t id = ids[t];
            if (id < 0 || id >= V) {
                if (d == 0)
                    kc_dev_fail(st, MOEK_E_INDEX);
                continue;
            }
            kc_st(dtable + id * D + d, kc_ld(dtable + id * D + d) + kc_ld(dout + t * D + d));
        }
    }
}

template <typename T>
static void kc_embedding_fwd(const moek_ctx *ctx, const int32_t *ids, const T *table, T *out,
                             int64_t N, int64_t V, int64_t D)
{
    if (!kc_shape(ctx, N >= 0 && V >= 0 && D >= 0) || N * D == 0)
        return;
    k_embedding_fwd<T><<<kc_blocks(N * D), KCUDA_THREADS, 0, kc_stream(ctx)>>>(
        ids, table, out, N, V, D, kc_dev_status(ctx));
    kc_launched(ctx);
}

extern "C" void moek_embedding_fwd(const moek_ctx *ctx, const int32_t *ids, const float *table,
                                   float *out, int64_t N, int64_t V, int64_t D)
{
    kc_embedding_fwd(ctx, ids, table, out, N, V, D);
}

extern "C" void moek_embedding_bwd(const moek_ctx *ctx, const float *dout, const int32_t *ids,
                                   float *dtable, int64_t N, int64_t V, int64_t D)
{
    if (!kc_shape(ctx, N >= 0 && V >= 0 && D >= 0) || V * D == 0)
        return;
    if (!kc_zero(ctx, dtable, V * D * (int64_t)sizeof(float)) || N == 0)
        return;
    k_embedding_bwd<float><<<kc_blocks(D, 128), 128, 0, kc_stream(ctx)>>>(dout, ids, dtable, N, V,
                                                                           D, kc_dev_status(ctx));
    kc_launched(ctx);
}

/* bf16 tables: the column walk above would round dtable to bf16 at every
 * add, so here a block keeps fp32 sums in shared memory for a tile of 32
 * columns x EB_IDS ids.  Warp w owns ids [v0 + 32w, v0 + 32w + 32) and scans
 * every token in order (the id load is a broadcast), adding the tokens that
 * fall in its ids; lane = column.  So each (id, column) sums the CPU's
 * tokens in the CPU's order in fp32 and is rounded once, with no atomics
 * and no workspace.  Every entry of dtable is written (untouched ids: 0). */
#define EB_WARPS 8
#define EB_IDS (EB_WARPS * 32)

template <typename T>
__global__ void k_embedding_bwd_tiled(const T *dout, const int32_t *ids, T *dtable, int64_t N,
                                      int64_t V, int64_t D, int *st)
{
    __shared__ float acc[EB_IDS][32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int64_t d = (int64_t)blockIdx.x * 32 + lane;
    int64_t v0 = (int64_t)blockIdx.y * EB_IDS + warp * 32;
    float(*mine)[32] = acc + warp * 32;   /* only this warp touches these rows */
    for (int i = 0; i < 32; i++)
        mine[i][lane] = 0.0f;
    bool first = blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0;
    for (int64_t t = 0; t < N; t++) {
        int64_t id = ids[t], r = id - v0;
        if (id < 0 || id >= V) {
            if (first)
                kc_dev_fail(st, MOEK_E_INDEX);
            continue;
        }
        if (r >= 0 && r < 32 && d < D)
            mine[r][lane] += kc_ld(dout + t * D + d);
    }
    if (d >= D)
        return;
    for (int i = 0; i < 32 && v0 + i < V; i++)
        kc_st(dtable + (v0 + i) * D + d, mine[i][lane]);
}

/* ---- the exported symbols: fp32 (above and here) and bf16 storage ------- */
extern "C" {

void moek_rmsnorm_fwd(const moek_ctx *ctx, const float *x, const float *w, float *y, float *rstd,
                      int64_t N, int64_t D, float eps)
{
    kc_rmsnorm_fwd(ctx, x, w, y, rstd, N, D, eps);
}

void moek_rmsnorm_bwd(const moek_ctx *ctx, const float *dy, const float *x, const float *w,
                      const float *rstd, float *dx, float *dw, int64_t N, int64_t D)
{
    kc_rmsnorm_bwd(ctx, dy, x, w, rstd, dx, dw, N, D);
}

void moek_rmsnorm_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *x, const moek_bf16 *w,
                           moek_bf16 *y, float *rstd, int64_t N, int64_t D, float eps)
{
    kc_rmsnorm_fwd(ctx, kc_bf(x), kc_bf(w), kc_bf(y), rstd, N, D, eps);
}

void moek_rmsnorm_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, const moek_bf16 *x,
                           const moek_bf16 *w, const float *rstd, moek_bf16 *dx, moek_bf16 *dw,
                           int64_t N, int64_t D)
{
    kc_rmsnorm_bwd(ctx, kc_bf(dy), kc_bf(x), kc_bf(w), rstd, kc_bf(dx), kc_bf(dw), N, D);
}

void moek_rope_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *x, moek_bf16 *y, int64_t B,
                        int64_t T, int64_t H, int64_t Dh, float theta)
{
    kc_rope(ctx, kc_bf(x), kc_bf(y), B, T, H, Dh, theta, 1.0);
}

void moek_rope_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, moek_bf16 *dx, int64_t B,
                        int64_t T, int64_t H, int64_t Dh, float theta)
{
    kc_rope(ctx, kc_bf(dy), kc_bf(dx), B, T, H, Dh, theta, -1.0);
}

void moek_embedding_fwd_bf16(const moek_ctx *ctx, const int32_t *ids, const moek_bf16 *table,
                             moek_bf16 *out, int64_t N, int64_t V, int64_t D)
{
    kc_embedding_fwd(ctx, ids, kc_bf(table), kc_bf(out), N, V, D);
}

void moek_embedding_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dout, const int32_t *ids,
                             moek_bf16 *dtable, int64_t N, int64_t V, int64_t D)
{
    if (!kc_shape(ctx, N >= 0 && V >= 0 && D >= 0) || V * D == 0)
        return;
    if (!kc_shape(ctx, (V + EB_IDS - 1) / EB_IDS <= 65535 && (D + 31) / 32 <= INT32_MAX))
        return;
    dim3 grid((unsigned)((D + 31) / 32), (unsigned)((V + EB_IDS - 1) / EB_IDS));
    k_embedding_bwd_tiled<kc_bf16><<<grid, 32 * EB_WARPS, 0, kc_stream(ctx)>>>(
        kc_bf(dout), ids, kc_bf(dtable), N, V, D, kc_dev_status(ctx));
    kc_launched(ctx);
}


/* ---- fp16 storage: the bf16 exports above instantiated with __half ---- */
void moek_rmsnorm_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, const moek_f16 *w,
                           moek_f16 *y, float *rstd, int64_t N, int64_t D, float eps)
{
    kc_rmsnorm_fwd(ctx, kc_hf(x), kc_hf(w), kc_hf(y), rstd, N, D, eps);
}

void moek_rmsnorm_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, const moek_f16 *x,
                           const moek_f16 *w, const float *rstd, moek_f16 *dx, moek_f16 *dw,
                           int64_t N, int64_t D)
{
    kc_rmsnorm_bwd(ctx, kc_hf(dy), kc_hf(x), kc_hf(w), rstd, kc_hf(dx), kc_hf(dw), N, D);
}

void moek_rope_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, moek_f16 *y, int64_t B,
                        int64_t T, int64_t H, int64_t Dh, float theta)
{
    kc_rope(ctx, kc_hf(x), kc_hf(y), B, T, H, Dh, theta, 1.0);
}

void moek_rope_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, moek_f16 *dx, int64_t B,
                        int64_t T, int64_t H, int64_t Dh, float theta)
{
    kc_rope(ctx, kc_hf(dy), kc_hf(dx), B, T, H, Dh, theta, -1.0);
}

void moek_embedding_fwd_f16(const moek_ctx *ctx, const int32_t *ids, const moek_f16 *table,
                             moek_f16 *out, int64_t N, int64_t V, int64_t D)
{
    kc_embedding_fwd(ctx, ids, kc_hf(table), kc_hf(out), N, V, D);
}

void moek_embedding_bwd_f16(const moek_ctx *ctx, const moek_f16 *dout, const int32_t *ids,
                             moek_f16 *dtable, int64_t N, int64_t V, int64_t D)
{
    if (!kc_shape(ctx, N >= 0 && V >= 0 && D >= 0) || V * D == 0)
        return;
    if (!kc_shape(ctx, (V + EB_IDS - 1) / EB_IDS <= 65535 && (D + 31) / 32 <= INT32_MAX))
        return;
    dim3 grid((unsigned)((D + 31) / 32), (unsigned)((V + EB_IDS - 1) / EB_IDS));
    k_embedding_bwd_tiled<kc_f16><<<grid, 32 * EB_WARPS, 0, kc_stream(ctx)>>>(
        kc_hf(dout), ids, kc_hf(dtable), N, V, D, kc_dev_status(ctx));
    kc_launched(ctx);
}

} /* extern "C" */
