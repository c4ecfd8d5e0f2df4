/* attention.cu - causal multi-head attention without a T x T matrix; twin
 * of kernels/cpu/attention.c.
 *
 * Shape of the work: one warp per output row.  A warp walks the keys in
 * chunks of 32, one key per lane: each lane computes its score, the warp
 * takes the chunk's max and sum (online softmax: running max m, running sum
 * l, the output row rescaled when m grows), then every lane updates the
 * output dimensions it owns from the chunk's 32 probabilities, which sit in
 * shared memory.  The query row and the output accumulator also live in
 * shared memory, so any head size works and nothing is indexed at run time
 * in registers.
 *
 * Backward recomputes the probabilities from lse: p = exp(s - lse_t),
 * ds = p (dO_t.v_j - D_t) scale, D_t = dO_t.O_t.  Two kernels, each writing
 * only its own rows, so there are no atomics and the result is
 * deterministic: dq (a warp per query row, over keys j <= t) and dk/dv (a
 * warp per key row, over queries i >= j, recomputing D_i per pair rather
 * than storing it).  Correct rather than fast; the GPU performance issue
 * brings tiles and tensor cores. */
#include "kcuda.cuh"

#define AT_WARPS 4

struct at_dims {
    int64_t B, T, H, Dh, W;
    float scale;
};

/* row-major index of (b, t, h, 0) */
__device__ inline int64_t at_off(const at_dims &a, int64_t b, int64_t t, int64_t h)
{
    return (b * a.T + t) * a.W + h * a.Dh;
}

template <typename T> __device__ inline float at_dot(const float *a, const T *b, int64_t n)
{
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++)
        s += a[i] * kc_ld(b + i);
    return s;
}

template <typename T> __device__ inline float at_dot2(const T *a, const T *b, int64_t n)
{
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++)
        s += kc_ld(a + i) * kc_ld(b + i);
    return s;
}

/* shared memory per warp: q[Dh], o[Dh], p[32] */
template <typename T>
__global__ void k_attn_fwd(const T *q, const T *k, const T *v, T *o, float *lse, at_dims a)
{
    extern __shared__ float at_shm[];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int64_t task = (int64_t)blockIdx.x * AT_WARPS + warp;   /* ((b H) + h) T + t */
    if (task >= a.B * a.H * a.T)
        return;   /* whole warp leaves together */
    int64_t t = task % a.T, bh = task / a.T, h = bh % a.H, b = bh / a.H, Dh = a.Dh;
    float *qs = at_shm + warp * (2 * Dh + 32), *os = qs + Dh, *ps = os + Dh;
    const T *qt = q + at_off(a, b, t, h);
    for (int64_t d = lane; d < Dh; d += 32) {
        qs[d] = kc_ld(qt + d);
        os[d] = 0.0f;
    }
    __syncwarp();
    float m = -INFINITY, l = 0.0f;
    for (int64_t j0 = 0; j0 <= t; j0 += 32) {
        int64_t j = j0 + lane;
        float s = -INFINITY;
        if (j <= t)
            s = at_dot(qs, k + at_off(a, b, j, h), Dh) * a.scale;
        float mn = fmaxf(m, kc_warp_max(s));
        float c = expf(m - mn);   /* 0 on the first chunk (m = -inf) */
        float p = j <= t ? expf(s - mn) : 0.0f;
        l = l * c + kc_warp_sum(p);
        ps[lane] = p;
        __syncwarp();
        int64_t nj = t - j0 + 1 < 32 ? t - j0 + 1 : 32;
        for (int64_t d = lane; d < Dh; d += 32) {
            float acc = os[d] * c;
            const T *vd = v + at_off(a, b, j0, h) + d;
            for (int64_t jj = 0; jj < nj; jj++)
                acc += ps[jj] * kc_ld(vd + jj * a.W);
            os[d] = acc;
        }
        __syncwarp();   /* ps is rewritten by the next chunk */
        m = mn;
    }
    float inv = 1.0f / l;
    T *ot = o + at_off(a, b, t, h);
    for (int64_t d = lane; d < Dh; d += 32)
        kc_st(ot + d, os[d] * inv);
    if (lane == 0)
        lse[bh * a.T + t] = m + logf(l);
}

/* dq: a warp per query row t.  shared per warp: q[Dh], dO[Dh], dq[Dh], ds[32] */
template <typename T>
__global__ void k_attn_bwd_dq(const T *dout, const T *q, const T *k, const T *v, const T *o,
                              const float *lse, T *dq, at_dims a)
{
    extern __shared__ float at_shm[];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int64_t task = (int64_t)blockIdx.x * AT_WARPS + warp;
    if (task >= a.B * a.H * a.T)
        return;
    int64_t t = task % a.T, bh = task / a.T, h = bh % a.H, b = bh / a.H, Dh = a.Dh;
    float *qs = at_shm + warp * (3 * Dh + 32), *dos = qs + Dh, *dqs = dos + Dh, *dss = dqs + Dh;
    int64_t off = at_off(a, b, t, h);
    float Dt = 0.0f;
    for (int64_t d = lane; d < Dh; d += 32) {
        qs[d] = kc_ld(q + off + d);
        dos[d] = kc_ld(dout + off + d);
        dqs[d] = 0.0f;
        Dt += dos[d] * kc_ld(o + off + d);
    }
    Dt = kc_warp_sum(Dt);
    __syncwarp();
    float L = lse[bh * a.T + t];
    for (int64_t j0 = 0; j0 <= t; j0 += 32) {
        int64_t j = j0 + lane;
        float ds = 0.0f;
        if (j <= t) {
            int64_t offj = at_off(a, b, j, h);
            float p = expf(at_dot(qs, k + offj, Dh) * a.scale - L);
            ds = p * (at_dot(dos, v + offj, Dh) - Dt) * a.scale;
        }
        dss[lane] = ds;
        __syncwarp();
        int64_t nj = t - j0 + 1 < 32 ? t - j0 + 1 : 32;
        for (int64_t d = lane; d < Dh; d += 32) {
            float acc = dqs[d];
            const T *kd = k + at_off(a, b, j0, h) + d;
            for (int64_t jj = 0; jj < nj; jj++)
                acc += dss[jj] * kc_ld(kd + jj * a.W);
            dqs[d] = acc;
        }
        __syncwarp();
    }
    for (int64_t d = lane; d < Dh; d += 32)
        kc_st(dq + off + d, dqs[d]);
}

/* dk, dv: a warp per key row j.  shared per warp: k[Dh], v[Dh], dk[Dh],
 * dv[Dh], p[32], ds[32] */
template <typename T>
__global__ void k_attn_bwd_dkdv(const T *dout, const T *q, const T *k, const T *v, const T *o,
                                const float *lse, T *dk, T *dv, at_dims a)
{
    extern __shared__ float at_shm[];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int64_t task = (int64_t)blockIdx.x * AT_WARPS + warp;
    if (task >= a.B * a.H * a.T)
        return;
    int64_t j = task % a.T, bh = task / a.T, h = bh % a.H, b = bh / a.H, Dh = a.Dh;
    float *ks = at_shm + warp * (4 * Dh + 64), *vs = ks + Dh, *dks = vs + Dh, *dvs = dks + Dh;
    float *pss = dvs + Dh, *dss = pss + 32;
    int64_t offj = at_off(a, b, j, h);
    for (int64_t d = lane; d < Dh; d += 32) {
        ks[d] = kc_ld(k + offj + d);
        vs[d] = kc_ld(v + offj + d);
        dks[d] = 0.0f;
        dvs[d] = 0.0f;
    }
    __syncwarp();
    for (int64_t i0 = j; i0 < a.T; i0 += 32) {
        int64_t i = i0 + lane;
        float p = 0.0f, ds = 0.0f;
        if (i < a.T) {
            int64_t offi = at_off(a, b, i, h);
            float Di = at_dot2(dout + offi, o + offi, Dh);
            p = expf(at_dot(ks, q + offi, Dh) * a.scale - lse[bh * a.T + i]);
            ds = p * (at_dot(vs, dout + offi, Dh) - Di) * a.scale;
        }
        pss[lane] = p;
        dss[lane] = ds;
        __syncwarp();
        int64_t ni = a.T - i0 < 32 ? a.T - i0 : 32;
        for (int64_t d = lane; d < Dh; d += 32) {
            float ak = dks[d], av = dvs[d];
            const T *qd = q + at_off(a, b, i0, h) + d, *dod = dout + at_off(a, b, i0, h) + d;
            for (int64_t ii = 0; ii < ni; ii++) {
                ak += dss[ii] * kc_ld(qd + ii * a.W);
                av += pss[ii] * kc_ld(dod + ii * a.W);
            }
            dks[d] = ak;
            dvs[d] = av;
        }
        __syncwarp();
    }
    for (int64_t d = lane; d < Dh; d += 32) {
        kc_st(dk + offj + d, dks[d]);
        kc_st(dv + offj + d, dvs[d]);
    }
}

static bool at_setup(const moek_ctx *ctx, at_dims *a, int64_t B, int64_t T, int64_t H, int64_t Dh,
                     int64_t floats_per_warp, const void *kernel, unsigned *blocks, size_t *shm)
{
    if (!kc_shape(ctx, B >= 0 && T >= 0 && H >= 0 && Dh >= 0))
        return false;
    int64_t rows = B * H * T;
    if (rows == 0)
        return false;
    a->B = B;
    a->T = T;
    a->H = H;
    a->Dh = Dh;
    a->W = H * Dh;
    a->scale = 1.0f / sqrtf((float)(Dh > 0 ? Dh : 1));
    *shm = (size_t)(AT_WARPS * floats_per_warp) * sizeof(float);
    if (!kc_shape(ctx, *shm <= 200 * 1024 && (rows + AT_WARPS - 1) / AT_WARPS <= INT32_MAX))
        return false;
    *blocks = (unsigned)((rows + AT_WARPS - 1) / AT_WARPS);
    if (*shm > 48 * 1024)   /* big heads: raise the dynamic limit */
        return kc_ok(ctx, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               (int)*shm));
    return true;
}

template <typename S>
static void kc_attention_fwd(const moek_ctx *ctx, const S *q, const S *k, const S *v, S *o,
                             float *lse, int64_t B, int64_t T, int64_t H, int64_t Dh)
{
    at_dims a;
    unsigned blocks;
    size_t shm;
    if (!at_setup(ctx, &a, B, T, H, Dh, 2 * Dh + 32, (const void *)k_attn_fwd<S>, &blocks,
                  &shm))
        return;
    k_attn_fwd<S><<<blocks, 32 * AT_WARPS, shm, kc_stream(ctx)>>>(q, k, v, o, lse, a);
    kc_launched(ctx);
}

template <typename S>
static void kc_attention_bwd(const moek_ctx *ctx, const S *dout, const S *q, const S *k, const S *v,
                             const S *o, const float *lse, S *dq, S *dk, S *dv, int64_t B,
                             int64_t T, int64_t H, int64_t Dh)
{
    at_dims a;
    unsigned blocks;
    size_t shm;
    if (!at_setup(ctx, &a, B, T, H, Dh, 3 * Dh + 32, (const void *)k_attn_bwd_dq<S>, &blocks,
                  &shm))
        return;
    k_attn_bwd_dq<S><<<blocks, 32 * AT_WARPS, shm, kc_stream(ctx)>>>(dout, q, k, v, o, lse,
                                                                          dq, a);
    if (!kc_launched(ctx))
        return;
    if (!at_setup(ctx, &a, B, T, H, Dh, 4 * Dh + 64, (const void *)k_attn_bwd_dkdv<S>,
                  &blocks, &shm))
        return;
    k_attn_bwd_dkdv<S><<<blocks, 32 * AT_WARPS, shm, kc_stream(ctx)>>>(dout, q, k, v, o, lse,
                                                                            dk, dv, a);
    kc_launched(ctx);
}

extern "C" {

void moek_attention_fwd(const moek_ctx *ctx, const float *q, const float *k, const float *v,
                        float *o, float *lse, int64_t B, int64_t T, int64_t H, int64_t Dh)
{
    kc_attention_fwd(ctx, q, k, v, o, lse, B, T, H, Dh);
}

void moek_attention_bwd(const moek_ctx *ctx, const float *dout, const float *q, const float *k,
                        const float *v, const float *o, const float *lse, float *dq, float *dk,
                        float *dv, int64_t B, int64_t T, int64_t H, int64_t Dh)
{
    kc_attention_bwd(ctx, dout, q, k, v, o, lse, dq, dk, dv, B, T, H, Dh);
}

/* bf16 q/k/v/o and gradients, fp32 lse; the maths stays fp32 */
void moek_attention_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *q, const moek_bf16 *k,
                             const moek_bf16 *v, moek_bf16 *o, float *lse, int64_t B, int64_t T,
                             int64_t H, int64_t Dh)
{
    kc_attention_fwd(ctx, kc_bf(q), kc_bf(k), kc_bf(v), kc_bf(o), lse, B, T, H, Dh);
}

void moek_attention_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dout, const moek_bf16 *q,
                             const moek_bf16 *k, const moek_bf16 *v, const moek_bf16 *o,
                             const float *lse, moek_bf16 *dq, moek_bf16 *dk, moek_bf16 *dv,
                             int64_t B, int64_t T, int64_t H, int64_t Dh)
{
    kc_attention_bwd(ctx, kc_bf(dout), kc_bf(q), kc_bf(k), kc_bf(v), kc_bf(o), lse, kc_bf(dq),
                     kc_bf(dk), kc_bf(dv), B, T, H, Dh);
}

} /* extern "C" */
