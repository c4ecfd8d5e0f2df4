/* fused.cu - the fused ops of kernels/moek.h (issue 8).  Twin of
 * kernels/cpu/fused.c: the same maths in the same rounding steps, with the
 * norm statistics in double as in norm.cu.  Residual add + RMSNorm reads a
 * and b once and writes s and y in one kernel (unfused: add writes s, the
 * norm reads it back twice); its backward adds the residual gradient ds in
 * the same pass that writes the norm's dx. */
#include "kcuda.cuh"

/* v stored in T and read back: where the unfused ops round */
template <typename T> __device__ inline float kfu_rt(float v)
{
    T t;
    kc_st(&t, v);
    return kc_ld(&t);
}

/* one block per row: s = a + b, rstd from the stored s, y = s r w */
template <typename T>
__global__ void k_add_rmsnorm_fwd(const T *a, const T *b, const T *w, T *s, T *y, float *rstd, int64_t D,
                                  float eps)
{
    __shared__ double shm[32];
    int64_t n = blockIdx.x;
    const T *ar = a + n * D, *br = b + n * D;
    T *sr = s + n * D, *yr = y + n * D;
    double ss = 0.0;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        double v = kfu_rt<T>(kc_ld(ar + d) + kc_ld(br + d));
        kc_st(sr + d, (float)v);
        ss += v * v;
    }
    ss = kc_block_sum_d(ss, shm);
    float r = (float)(1.0 / sqrt(ss / (double)(D > 0 ? D : 1) + (double)eps));
    if (threadIdx.x == 0)
        rstd[n] = r;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x)   /* each thread reads back what it wrote */
        kc_st(yr + d, kc_ld(sr + d) * r * kc_ld(w + d));
}

/* one block per row: dx as moek_rmsnorm_bwd, then da = db = dx + ds */
template <typename T>
__global__ void k_add_rmsnorm_bwd_dx(const T *dy, const T *ds, const T *s, const T *w, const float *rstd, T *da,
                                     T *db, int64_t D)
{
    __shared__ double shm[32];
    int64_t n = blockIdx.x;
    const T *sr = s + n * D, *dyr = dy + n * D, *dsr = ds + n * D;
    double dot = 0.0;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
        dot += (double)kc_ld(dyr + d) * kc_ld(w + d) * kc_ld(sr + d);
    dot = kc_block_sum_d(dot, shm);
    double r = rstd[n];
    double c = r * r * dot / (double)(D > 0 ? D : 1);
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        float dx = kfu_rt<T>((float)(r * ((double)kc_ld(w + d) * kc_ld(dyr + d) - kc_ld(sr + d) * c)));
        float g = dx + kc_ld(dsr + d);
        kc_st(da + n * D + d, g);
        kc_st(db + n * D + d, g);
    }
}

/* dw_d = sum_n dy s r, one thread per column over the rows in order */
template <typename T>
__global__ void k_add_rmsnorm_bwd_dw(const T *dy, const T *s, const float *rstd, T *dw, int64_t N, int64_t D)
{
    KC_GRID_STRIDE(d, D) {
        double acc = 0.0;
        for (int64_t n = 0; n < N; n++)
            acc += (double)kc_ld(dy + n * D + d) * kc_ld(s + n * D + d) * (double)rstd[n];
        kc_st(dw + d, (float)acc);
    }
}

template <typename T>
static void kfu_add_rmsnorm_fwd(const moek_ctx *ctx, const T *a, const T *b, const T *w, T *s, T *y, float *rstd,
                                int64_t N, int64_t D, float eps)
{
    if (!kc_shape(ctx, N >= 0 && D >= 0 && N <= INT32_MAX) || N == 0)
        return;
    k_add_rmsnorm_fwd<T><<<(unsigned)N, KCUDA_THREADS, 0, kc_stream(ctx)>>>(a, b, w, s, y, rstd, D, eps);
    kc_launched(ctx);
}

template <typename T>
static void kfu_add_rmsnorm_bwd(const moek_ctx *ctx, const T *dy, const T *ds, const T *s, const T *w,
                                const float *rstd, T *da, T *db, T *dw, int64_t N, int64_t D)
{
    if (!kc_shape(ctx, N >= 0 && D >= 0 && N <= INT32_MAX))
        return;
    if (N > 0) {
        k_add_rmsnorm_bwd_dx<T><<<(unsigned)N, KCUDA_THREADS, 0, kc_stream(ctx)>>>(dy, ds, s, w, rstd, da, db, D);
        if (!kc_launched(ctx))
            return;
    }
    if (D > 0) {
        k_add_rmsnorm_bwd_dw<T><<<kc_blocks(D, 128), 128, 0, kc_stream(ctx)>>>(dy, s, rstd, dw, N, D);
        kc_launched(ctx);
    }
}

extern "C" void moek_add_rmsnorm_fwd(const moek_ctx *ctx, const float *a, const float *b, const float *w, float *s,
                                     float *y, float *rstd, int64_t N, int64_t D, float eps)
{
    kfu_add_rmsnorm_fwd(ctx, a, b, w, s, y, rstd, N, D, eps);
}

extern "C" void moek_add_rmsnorm_bwd(const moek_ctx *ctx, const float *dy, const float *ds, const float *s,
                                     const float *w, const float *rstd, float *da, float *db, float *dw,
                                     int64_t N, int64_t D)
{
    kfu_add_rmsnorm_bwd(ctx, dy, ds, s, w, rstd, da, db, dw, N, D);
}

extern "C" void moek_add_rmsnorm_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *a, const moek_bf16 *b,
                                          const moek_bf16 *w, moek_bf16 *s, moek_bf16 *y, float *rstd,
                                          int64_t N, int64_t D, float eps)
{
    kfu_add_rmsnorm_fwd(ctx, kc_bf(a), kc_bf(b), kc_bf(w), kc_bf(s), kc_bf(y), rstd, N, D, eps);
}

extern "C" void moek_add_rmsnorm_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, const moek_bf16 *ds,
                                          const moek_bf16 *s, const moek_bf16 *w, const float *rstd,
                                          moek_bf16 *da, moek_bf16 *db, moek_bf16 *dw, int64_t N, int64_t D)
{
    kfu_add_rmsnorm_bwd(ctx, kc_bf(dy), kc_bf(ds), kc_bf(s), kc_bf(w), rstd, kc_bf(da), kc_bf(db), kc_bf(dw),
                        N, D);
}
