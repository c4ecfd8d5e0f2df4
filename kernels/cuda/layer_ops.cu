/* layer_ops.cu - LayerNorm with bias, SiLU, repeat_kv and bias_add: twins of
 * kernels/cpu/layer_ops.c, templated on the storage type (float or bf16;
 * fp32 maths either way).  Row statistics and column sums in double, each
 * column owned by one thread and walked in row order, so results are
 * deterministic. */
#include "kcuda.cuh"

/* ---- layernorm: one block per row ----------------------------------------- */
template <typename T>
__global__ void k_layernorm_fwd(const T *x, const T *w, const T *b, T *y, float *mean, float *rstd,
                                int64_t D, float eps)
{
    __shared__ double shm[32];
    int64_t n = blockIdx.x;
    const T *xr = x + n * D;
    T *yr = y + n * D;
    double inv_d = 1.0 / (double)(D > 0 ? D : 1);
    double s = 0.0;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
        s += (double)kc_ld(xr + d);
    double mu = kc_block_sum_d(s, shm) * inv_d;
    double ss = 0.0;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        double v = (double)kc_ld(xr + d) - mu;
        ss += v * v;
    }
    ss = kc_block_sum_d(ss, shm);
    float m = (float)mu, r = (float)(1.0 / sqrt(ss * inv_d + (double)eps));
    if (threadIdx.x == 0) {
        mean[n] = m;
        rstd[n] = r;
    }
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
        kc_st(yr + d, (kc_ld(xr + d) - m) * r * kc_ld(w + d) + kc_ld(b + d));
}

template <typename T>
__global__ void k_layernorm_bwd_dx(const T *dy, const T *x, const T *w, const float *mean,
                                   const float *rstd, T *dx, int64_t D)
{
    __shared__ double shm[32];
    int64_t n = blockIdx.x;
    const T *xr = x + n * D, *dyr = dy + n * D;
    T *dxr = dx + n * D;
    double m = mean[n], r = rstd[n], inv_d = 1.0 / (double)(D > 0 ? D : 1);
    double sg = 0.0, sgx = 0.0;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        double g = (double)kc_ld(dyr + d) * kc_ld(w + d);
        sg += g;
        sgx += g * ((double)kc_ld(xr + d) - m) * r;
    }
    sg = kc_block_sum_d(sg, shm) * inv_d;
    sgx = kc_block_sum_d(sgx, shm) * inv_d;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        double xh = ((double)kc_ld(xr + d) - m) * r;
        kc_st(dxr + d, (float)(r * ((double)kc_ld(dyr + d) * kc_ld(w + d) - sg - xh * sgx)));
    }
}

template <typename T>
__global__ void k_layernorm_bwd_dwdb(const T *dy, const T *x, const float *mean, const float *rstd,
                                     T *dw, T *db, int64_t N, int64_t D)
{
    KC_GRID_STRIDE(d, D) {
        double aw = 0.0, ab = 0.0;
        for (int64_t n = 0; n < N; n++) {
            double g = kc_ld(dy + n * D + d);
            aw += g * ((double)kc_ld(x + n * D + d) - mean[n]) * rstd[n];
            ab += g;
        }
        if (dw)
            kc_st(dw + d, (float)aw);
        if (db)
            kc_st(db + d, (float)ab);
    }
}

template <typename T>
static void kc_layernorm_fwd(const moek_ctx *ctx, const T *x, const T *w, const T *b, T *y,
                             float *mean, float *rstd, int64_t N, int64_t D, float eps)
{
    if (!kc_shape(ctx, N >= 0 && D >= 0 && N <= INT32_MAX) || N == 0)
        return;
    k_layernorm_fwd<T><<<(unsigned)N, KCUDA_THREADS, 0, kc_stream(ctx)>>>(x, w, b, y, mean, rstd, D,
                                                                          eps);
    kc_launched(ctx);
}

template <typename T>
static void kc_layernorm_bwd(const moek_ctx *ctx, const T *dy, const T *x, const T *w,
                             const float *mean, const float *rstd, T *dx, T *dw, T *db, int64_t N,
                             int64_t D)
{
    if (!kc_shape(ctx, N >= 0 && D >= 0 && N <= INT32_MAX))
        return;
    if (dx && N > 0) {
        k_layernorm_bwd_dx<T><<<(unsigned)N, KCUDA_THREADS, 0, kc_stream(ctx)>>>(dy, x, w, mean,
                                                                                 rstd, dx, D);
        if (!kc_launched(ctx))
            return;
    }
    if ((dw || db) && D > 0) {
        k_layernorm_bwd_dwdb<T><<<kc_blocks(D, 128), 128, 0, kc_stream(ctx)>>>(dy, x, mean, rstd, dw,
                                                                               db, N, D);
        kc_launched(ctx);
    }
}

/* ---- silu ----------------------------------------------------------------- */
template <typename T> __global__ void k_silu_fwd(const T *x, T *y, int64_t n)
{
    KC_GRID_STRIDE(i, n) {
        float v = kc_ld(x + i);
        kc_st(y + i, v / (1.0f + expf(-v)));
    }
}

template <typename T> __global__ void k_silu_bwd(const T *dy, const T *x, T *dx, int64_t n)
{
    KC_GRID_STRIDE(i, n) {
        float v = kc_ld(x + i);
        float s = 1.0f / (1.0f + expf(-v));
        kc_st(dx + i, kc_ld(dy + i) * s * (1.0f + v * (1.0f - s)));
    }
}

template <typename T> static void kc_silu_fwd(const moek_ctx *ctx, const T *x, T *y, int64_t n)
{
    if (n <= 0)
        return;
    k_silu_fwd<T><<<kc_blocks(n), KCUDA_THREADS, 0, kc_stream(ctx)>>>(x, y, n);
    kc_launched(ctx);
}

template <typename T>
static void kc_silu_bwd(const moek_ctx *ctx, const T *dy, const T *x, T *dx, int64_t n)
{
    if (n <= 0)
        return;
    k_silu_bwd<T><<<kc_blocks(n), KCUDA_THREADS, 0, kc_stream(ctx)>>>(dy, x, dx, n);
    kc_launched(ctx);
}

/* ---- repeat_kv: one thread per output element (fwd) or input element (bwd) */
template <typename T>
__global__ void k_repeat_kv_fwd(const T *x, T *y, int64_t N, int64_t Hkv, int64_t H, int64_t Dh)
{
    int64_t rep = H / Hkv;
    KC_GRID_STRIDE(i, N * H * Dh) {
        int64_t d = i % Dh, h = (i / Dh) % H, n = i / (Dh * H);
        y[i] = x[(n * Hkv + h / rep) * Dh + d];
    }
}

template <typename T>
__global__ void k_repeat_kv_bwd(const T *dy, T *dx, int64_t N, int64_t Hkv, int64_t H, int64_t Dh)
{
    int64_t rep = H / Hkv;
    KC_GRID_STRIDE(i, N * Hkv * Dh) {
        int64_t d = i % Dh, k = (i / Dh) % Hkv, n = i / (Dh * Hkv);
        float s = 0.0f;   /* fp32, head order: the CPU's sum exactly */
        for (int64_t g = 0; g < rep; g++)
            s += kc_ld(dy + (n * H + k * rep + g) * Dh + d);
        kc_st(dx + i, s);
    }
}

template <typename T>
static void kc_repeat_kv(const moek_ctx *ctx, bool bwd, const T *src, T *dst, int64_t N,
                         int64_t Hkv, int64_t H, int64_t Dh)
{
    if (!kc_shape(ctx, N >= 0 && Hkv > 0 && H >= 0 && Dh >= 0 && H % Hkv == 0))
        return;
    int64_t items = N * (bwd ? Hkv : H) * Dh;
    if (items == 0)
        return;
    if (bwd)
        k_repeat_kv_bwd<T><<<kc_blocks(items), KCUDA_THREADS, 0, kc_stream(ctx)>>>(src, dst, N, Hkv,
                                                                                   H, Dh);
    else
        k_repeat_kv_fwd<T><<<kc_blocks(items), KCUDA_THREADS, 0, kc_stream(ctx)>>>(src, dst, N, Hkv,
                                                                                   H, Dh);
    kc_launched(ctx);
}

/* ---- bias_add ---------------------------------------------------------------- */
template <typename T> __global__ void k_bias_add_fwd(const T *x, const T *b, T *y, int64_t N, int64_t D)
{
    KC_GRID_STRIDE(i, N * D)
        kc_st(y + i, kc_ld(x + i) + kc_ld(b + i % D));
}

template <typename T> __global__ void k_bias_add_db(const T *dy, T *db, int64_t N, int64_t D)
{
    KC_GRID_STRIDE(d, D) {
        double acc = 0.0;
        for (int64_t n = 0; n < N; n++)
            acc += (double)kc_ld(dy + n * D + d);
        kc_st(db + d, (float)acc);
    }
}

template <typename T>
static void kc_bias_add_fwd(const moek_ctx *ctx, const T *x, const T *b, T *y, int64_t N, int64_t D)
{
    if (!kc_shape(ctx, N >= 0 && D >= 0) || N * D == 0)
        return;
    k_bias_add_fwd<T><<<kc_blocks(N * D), KCUDA_THREADS, 0, kc_stream(ctx)>>>(x, b, y, N, D);
    kc_launched(ctx);
}

template <typename T>
static void kc_bias_add_bwd(const moek_ctx *ctx, const T *dy, T *dx, T *db, int64_t N, int64_t D)
{
    if (!kc_shape(ctx, N >= 0 && D >= 0))
        return;
    if (dx && dx != dy && N * D > 0 &&
        !kc_ok(ctx, cudaMemcpyAsync(dx, dy, (size_t)(N * D) * sizeof(T), cudaMemcpyDeviceToDevice,
                                    kc_stream(ctx))))
        return;
    if (db && D > 0) {
        k_bias_add_db<T><<<kc_blocks(D, 128), 128, 0, kc_stream(ctx)>>>(dy, db, N, D);
        kc_launched(ctx);
    }
}

/* ---- the ABI ------------------------------------------------------------------ */
extern "C" {

void moek_layernorm_fwd(const moek_ctx *ctx, const float *x, const float *w, const float *b, float *y,
                        float *mean, float *rstd, int64_t N, int64_t D, float eps)
{
    kc_layernorm_fwd(ctx, x, w, b, y, mean, rstd, N, D, eps);
}

void moek_layernorm_bwd(const moek_ctx *ctx, const float *dy, const float *x, const float *w,
                        const float *mean, const float *rstd, float *dx, float *dw, float *db,
                        int64_t N, int64_t D)
{
    kc_layernorm_bwd(ctx, dy, x, w, mean, rstd, dx, dw, db, N, D);
}

void moek_silu_fwd(const moek_ctx *ctx, const float *x, float *y, int64_t n)
{
    kc_silu_fwd(ctx, x, y, n);
}

void moek_silu_bwd(const moek_ctx *ctx, const float *dy, const float *x, float *dx, int64_t n)
{
    kc_silu_bwd(ctx, dy, x, dx, n);
}

void moek_repeat_kv_fwd(const moek_ctx *ctx, const float *x, float *y, int64_t N, int64_t Hkv,
                        int64_t H, int64_t Dh)
{
    kc_repeat_kv(ctx, false, x, y, N, Hkv, H, Dh);
}

void moek_repeat_kv_bwd(const moek_ctx *ctx, const float *dy, float *dx, int64_t N, int64_t Hkv,
                        int64_t H, int64_t Dh)
{
    kc_repeat_kv(ctx, true, dy, dx, N, Hkv, H, Dh);
}

void moek_bias_add_fwd(const moek_ctx *ctx, const float *x, const float *b, float *y, int64_t N,
                       int64_t D)
{
    kc_bias_add_fwd(ctx, x, b, y, N, D);
}

void moek_bias_add_bwd(const moek_ctx *ctx, const float *dy, float *dx, float *db, int64_t N,
                       int64_t D)
{
    kc_bias_add_bwd(ctx, dy, dx, db, N, D);
}

void moek_layernorm_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *x, const moek_bf16 *w,
                             const moek_bf16 *b, moek_bf16 *y, float *mean, float *rstd, int64_t N,
                             int64_t D, float eps)
{
    kc_layernorm_fwd(ctx, kc_bf(x), kc_bf(w), kc_bf(b), kc_bf(y), mean, rstd, N, D, eps);
}

void moek_layernorm_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, const moek_bf16 *x,
                             const moek_bf16 *w, const float *mean, const float *rstd,
                             moek_bf16 *dx, moek_bf16 *dw, moek_bf16 *db, int64_t N, int64_t D)
{
    kc_layernorm_bwd(ctx, kc_bf(dy), kc_bf(x), kc_bf(w), mean, rstd, kc_bf(dx), kc_bf(dw), kc_bf(db),
                     N, D);
}

void moek_silu_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *x, moek_bf16 *y, int64_t n)
{
    kc_silu_fwd(ctx, kc_bf(x), kc_bf(y), n);
}

void moek_silu_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, const moek_bf16 *x, moek_bf16 *dx,
                        int64_t n)
{
    kc_silu_bwd(ctx, kc_bf(dy), kc_bf(x), kc_bf(dx), n);
}

void moek_repeat_kv_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *x, moek_bf16 *y, int64_t N,
                             int64_t Hkv, int64_t H, int64_t Dh)
{
    kc_repeat_kv(ctx, false, kc_bf(x), kc_bf(y), N, Hkv, H, Dh);
}

void moek_repeat_kv_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, moek_bf16 *dx, int64_t N,
                             int64_t Hkv, int64_t H, int64_t Dh)
{
    kc_repeat_kv(ctx, true, kc_bf(dy), kc_bf(dx), N, Hkv, H, Dh);
}

void moek_bias_add_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *x, const moek_bf16 *b,
                            moek_bf16 *y, int64_t N, int64_t D)
{
    kc_bias_add_fwd(ctx, kc_bf(x), kc_bf(b), kc_bf(y), N, D);
}

void moek_bias_add_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, moek_bf16 *dx, moek_bf16 *db,
                            int64_t N, int64_t D)
{
    kc_bias_add_bwd(ctx, kc_bf(dy), kc_bf(dx), kc_bf(db), N, D);
}


/* ---- fp16 storage: the bf16 exports above instantiated with __half ---- */
void moek_layernorm_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, const moek_f16 *w,
                             const moek_f16 *b, moek_f16 *y, float *mean, float *rstd, int64_t N,
                             int64_t D, float eps)
{
    kc_layernorm_fwd(ctx, kc_hf(x), kc_hf(w), kc_hf(b), kc_hf(y), mean, rstd, N, D, eps);
}

void moek_layernorm_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, const moek_f16 *x,
                             const moek_f16 *w, const float *mean, const float *rstd,
                             moek_f16 *dx, moek_f16 *dw, moek_f16 *db, int64_t N, int64_t D)
{
    kc_layernorm_bwd(ctx, kc_hf(dy), kc_hf(x), kc_hf(w), mean, rstd, kc_hf(dx), kc_hf(dw), kc_hf(db),
                     N, D);
}

void moek_silu_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, moek_f16 *y, int64_t n)
{
    kc_silu_fwd(ctx, kc_hf(x), kc_hf(y), n);
}

void moek_silu_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, const moek_f16 *x, moek_f16 *dx,
                        int64_t n)
{
    kc_silu_bwd(ctx, kc_hf(dy), kc_hf(x), kc_hf(dx), n);
}

void moek_repeat_kv_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, moek_f16 *y, int64_t N,
                             int64_t Hkv, int64_t H, int64_t Dh)
{
    kc_repeat_kv(ctx, false, kc_hf(x), kc_hf(y), N, Hkv, H, Dh);
}

void moek_repeat_kv_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, moek_f16 *dx, int64_t N,
                             int64_t Hkv, int64_t H, int64_t Dh)
{
    kc_repeat_kv(ctx, true, kc_hf(dy), kc_hf(dx), N, Hkv, H, Dh);
}

void moek_bias_add_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, const moek_f16 *b,
                            moek_f16 *y, int64_t N, int64_t D)
{
    kc_bias_add_fwd(ctx, kc_hf(x), kc_hf(b), kc_hf(y), N, D);
}

void moek_bias_add_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, moek_f16 *dx, moek_f16 *db,
                            int64_t N, int64_t D)
{
    kc_bias_add_bwd(ctx, kc_hf(dy), kc_hf(dx), kc_hf(db), N, D);
}

}   /* extern "C" */
