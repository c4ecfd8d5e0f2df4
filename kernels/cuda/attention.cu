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
 * than storing it).  Correct rather than fast.  bf16 has tensor-core
 * kernels for the common head sizes, forward (k_fa_fwd) and backward
 * (k_fa_bwd_*), below; other cases run here. */
#include <mma.h>

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

static at_dims at_make(int64_t B, int64_t T, int64_t H, int64_t Dh)
{
    at_dims a;
    a.B = B;
    a.T = T;
    a.H = H;
    a.Dh = Dh;
    a.W = H * Dh;
    a.scale = 1.0f / sqrtf((float)(Dh > 0 ? Dh : 1));
    return a;
}

static bool at_setup(const moek_ctx *ctx, at_dims *a, int64_t B, int64_t T, int64_t H, int64_t Dh,
                     int64_t floats_per_warp, const void *kernel, unsigned *blocks, size_t *shm)
{
    if (!kc_shape(ctx, B >= 0 && T >= 0 && H >= 0 && Dh >= 0))
        return false;
    int64_t rows = B * H * T;
    if (rows == 0)
        return false;
    *a = at_make(B, T, H, Dh);
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

/* ---- bf16 forward on the tensor cores (flash-attention-2 shape) ----------
 * A block per (b, h, 64-query tile), 4 warps of 16 query rows.  For each
 * 64-key tile at or before the diagonal: K and V go to shared memory (16-byte
 * cp.async), each warp computes S = Q K^T with WMMA (bf16 in, fp32
 * accumulate), takes the online softmax in fp32 (two lanes per row), writes
 * P as bf16 and adds P V into its fp32 output rows.  WMMA's accumulator
 * layout is opaque, so the output rows live in shared memory, where the
 * softmax rescales them; P rounded to bf16 is the one extra rounding (about
 * 2^-9 of each weight), while l sums the fp32 P as the CPU does.  Heads of
 * 16, 32, 64 or 128 with H*Dh a multiple of 8 and 16-byte aligned bases take
 * this path; the rest the warp-per-row kernel above. */
#define FA_BQ 64
#define FA_BK 64
#define FA_SLD (FA_BK + 4)   /* fp32 score row stride (pad: fewer bank conflicts) */
#define FA_PLD (FA_BK + 8)   /* bf16 P row stride */

template <int D> struct fa_lay {
    static constexpr int ld = D + 8;   /* bf16 row stride of Q, K, V tiles */
    static constexpr int old = D + 4;  /* fp32 output row stride */
    static constexpr size_t q = 0, k = q + (size_t)FA_BQ * ld * 2, v = k + (size_t)FA_BK * ld * 2,
                            s = v + (size_t)FA_BK * ld * 2, p = s + (size_t)FA_BQ * FA_SLD * 4,
                            o = p + (size_t)FA_BQ * FA_PLD * 2, bytes = o + (size_t)FA_BQ * old * 4;
};

/* rows [t0, t0+64) of one head into a [64][D+8] tile; rows >= T are zeros */
template <int D>
__device__ inline void fa_load(kc_bf16 *dst, const kc_bf16 *src, const at_dims &a, int64_t b,
                               int64_t h, int64_t t0)
{
    constexpr int CH = D / 8;   /* 16-byte chunks per row */
    for (int c = threadIdx.x; c < 64 * CH; c += 128) {
        int r = c / CH, d = (c % CH) * 8;
        bool ok = t0 + r < a.T;
        kc_cp16(dst + r * fa_lay<D>::ld + d, ok ? src + at_off(a, b, t0 + r, h) + d : src,
                ok ? 16 : 0);
    }
    kc_cp_commit();
}

/* C (16 x 64, fp32, ld FA_SLD) = A (16 rows of a [.][D+8] tile) . B^T, B's
 * 64 rows another tile: the scores, or dP */
template <int D>
__device__ inline void fa_rows_by_tile(float *c, const kc_bf16 *a, const kc_bf16 *b)
{
    using namespace nvcuda;
    constexpr int ld = fa_lay<D>::ld;
#pragma unroll
    for (int n = 0; n < 64 / 16; n++) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> cf;
        wmma::fill_fragment(cf, 0.0f);
#pragma unroll
        for (int kd = 0; kd < D; kd += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, kc_bf16, wmma::row_major> af;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, kc_bf16, wmma::col_major> bf;
            wmma::load_matrix_sync(af, a + kd, ld);
            wmma::load_matrix_sync(bf, b + n * 16 * ld + kd, ld);
            wmma::mma_sync(cf, af, bf, cf);
        }
        wmma::store_matrix_sync(c + n * 16, cf, FA_SLD, wmma::mem_row_major);
    }
}

/* acc (16 x D fp32 rows, ld D+4) += A (16 x 64 bf16, ld FA_PLD) . B (a
 * [64][D+8] tile) */
template <int D>
__device__ inline void fa_acc_rows(float *acc, const kc_bf16 *a, const kc_bf16 *b)
{
    using namespace nvcuda;
    constexpr int ld = fa_lay<D>::ld, old = fa_lay<D>::old;
#pragma unroll
    for (int dn = 0; dn < D; dn += 16) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> cf;
        wmma::load_matrix_sync(cf, acc + dn, old, wmma::mem_row_major);
#pragma unroll
        for (int kk = 0; kk < 64; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, kc_bf16, wmma::row_major> af;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, kc_bf16, wmma::row_major> bf;
            wmma::load_matrix_sync(af, a + kk, FA_PLD);
            wmma::load_matrix_sync(bf, b + kk * ld + dn, ld);
            wmma::mma_sync(cf, af, bf, cf);
        }
        wmma::store_matrix_sync(acc + dn, cf, old, wmma::mem_row_major);
    }
}

template <int D>
__global__ void __launch_bounds__(128) k_fa_fwd(const kc_bf16 *q, const kc_bf16 *k,
                                                const kc_bf16 *v, kc_bf16 *o, float *lse,
                                                at_dims a)
{
    typedef fa_lay<D> L;
    extern __shared__ __align__(128) unsigned char fa_shm[];
    kc_bf16 *qs = reinterpret_cast<kc_bf16 *>(fa_shm + L::q);
    kc_bf16 *ks = reinterpret_cast<kc_bf16 *>(fa_shm + L::k);
    kc_bf16 *vs = reinterpret_cast<kc_bf16 *>(fa_shm + L::v);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float *ss = reinterpret_cast<float *>(fa_shm + L::s) + warp * 16 * FA_SLD;
    kc_bf16 *ps = reinterpret_cast<kc_bf16 *>(fa_shm + L::p) + warp * 16 * FA_PLD;
    float *os = reinterpret_cast<float *>(fa_shm + L::o) + warp * 16 * L::old;

    /* the longest rows (last query tiles) start first */
    int64_t ntile = (a.T + FA_BQ - 1) / FA_BQ;
    int64_t qt = ntile - 1 - (int64_t)blockIdx.x % ntile, bh = (int64_t)blockIdx.x / ntile;
    int64_t h = bh % a.H, b = bh / a.H, q0 = qt * FA_BQ;

    fa_load<D>(qs, q, a, b, h, q0);
    int r = lane >> 1, half = lane & 1;   /* this lane's row in the warp, and its half */
    for (int d = half; d < D; d += 2)
        os[r * L::old + d] = 0.0f;
    int64_t gi = q0 + warp * 16 + r;
    float m = -INFINITY, l = 0.0f;

    for (int64_t j0 = 0; j0 <= q0; j0 += FA_BK) {
        __syncthreads();   /* every warp is done with the previous K, V */
        fa_load<D>(ks, k, a, b, h, j0);
        fa_load<D>(vs, v, a, b, h, j0);
        kc_cp_wait<0>();
        __syncthreads();
        fa_rows_by_tile<D>(ss, qs + warp * 16 * L::ld, ks);   /* S = Q K^T, this warp's 16 rows */
        __syncwarp();
        /* online softmax: this lane takes columns half, half+2, ... of row r */
        float mx = -INFINITY;
#pragma unroll 8
        for (int c = half; c < FA_BK; c += 2) {
            int64_t j = j0 + c;
            float sv = j <= gi ? ss[r * FA_SLD + c] * a.scale : -INFINITY;
            ss[r * FA_SLD + c] = sv;
            mx = fmaxf(mx, sv);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        float mn = fmaxf(m, mx);
        float cf = mn == -INFINITY ? 1.0f : expf(m - mn);   /* 0 on the first tile */
        float ls = 0.0f;
#pragma unroll 8
        for (int c = half; c < FA_BK; c += 2) {
            float sv = ss[r * FA_SLD + c];
            float pv = sv == -INFINITY ? 0.0f : expf(sv - mn);
            ls += pv;
            ps[r * FA_PLD + c] = __float2bfloat16_rn(pv);
        }
        ls += __shfl_xor_sync(0xffffffffu, ls, 1);
        l = l * cf + ls;
        m = mn;
        for (int d = half; d < D; d += 2)
            os[r * L::old + d] *= cf;
        __syncwarp();
        fa_acc_rows<D>(os, ps, vs);   /* O += P V */
        __syncwarp();
    }
    if (gi < a.T) {
        float inv = 1.0f / l;
        kc_bf16 *ot = o + at_off(a, b, gi, h);
        for (int d = half * 2; d < D; d += 4) {
            __nv_bfloat162 v2 = __floats2bfloat162_rn(os[r * L::old + d] * inv,
                                                      os[r * L::old + d + 1] * inv);
            *reinterpret_cast<__nv_bfloat162 *>(ot + d) = v2;
        }
        if (half == 0)
            lse[bh * a.T + gi] = m + logf(l);
    }
}

template <int D>
static void fa_launch(const moek_ctx *ctx, const kc_bf16 *q, const kc_bf16 *k, const kc_bf16 *v,
                      kc_bf16 *o, float *lse, const at_dims &a)
{
    size_t shm = fa_lay<D>::bytes;
    if (!kc_ok(ctx, cudaFuncSetAttribute((const void *)k_fa_fwd<D>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shm)))
        return;
    unsigned blocks = (unsigned)(a.B * a.H * ((a.T + FA_BQ - 1) / FA_BQ));
    k_fa_fwd<D><<<blocks, 128, shm, kc_stream(ctx)>>>(q, k, v, o, lse, a);
    kc_launched(ctx);
}

/* true when the tensor-core kernel took the call */
/* What the tensor-core kernels (forward and backward) need: a head size
 * they are built for, rows of whole 16-byte chunks at 16-byte aligned
 * bases (`bases`: the pointers or-ed together), a grid of 64-row tiles
 * that fits. */
static bool fa_tc_shape(int64_t B, int64_t T, int64_t H, int64_t Dh, uintptr_t bases)
{
    return B > 0 && T > 0 && H > 0 && (Dh == 16 || Dh == 32 || Dh == 64 || Dh == 128) &&
           (H * Dh) % 8 == 0 && (bases & 15) == 0 && B * H * ((T + FA_BQ - 1) / FA_BQ) <= INT32_MAX;
}

static bool fa_fwd_bf16(const moek_ctx *ctx, const kc_bf16 *q, const kc_bf16 *k, const kc_bf16 *v,
                        kc_bf16 *o, float *lse, int64_t B, int64_t T, int64_t H, int64_t Dh)
{
    if (!fa_tc_shape(B, T, H, Dh, (uintptr_t)q | (uintptr_t)k | (uintptr_t)v | (uintptr_t)o))
        return false;
    at_dims a = at_make(B, T, H, Dh);
    switch (Dh) {
    case 16: fa_launch<16>(ctx, q, k, v, o, lse, a); return true;
    case 32: fa_launch<32>(ctx, q, k, v, o, lse, a); return true;
    case 64: fa_launch<64>(ctx, q, k, v, o, lse, a); return true;
    case 128: fa_launch<128>(ctx, q, k, v, o, lse, a); return true;
    default: return false;
    }
}

/* ---- bf16 backward on the tensor cores ---------------------------------------
 * FlashAttention-2's backward, in two kernels so that no two blocks add
 * into the same row (no float atomics: deterministic, and a replayed graph
 * is bit for bit the eager run), as the warp-per-row kernels above:
 *  - k_fa_bwd_dkdv: a block per (b, h, 64-key tile), over the query tiles
 *    at or after it; per 16 key rows (a warp): S^T = K Q^T, P^T =
 *    exp(S^T scale - lse), dP^T = V dO^T, dS^T = P^T (dP^T - D) scale,
 *    then dV += P^T dO and dK += dS^T Q;
 *  - k_fa_bwd_dq: a block per (b, h, 64-query tile), over the key tiles at
 *    or before it; per 16 query rows: S, P, dP = dO V^T and dS again, then
 *    dQ += dS K.
 * D_i = dO_i . O_i is computed once (k_fa_bwd_delta) into the workspace.
 * The five products are WMMA (bf16 in, fp32 accumulate); P and dS are
 * rounded to bf16 for them (the forward's one extra rounding, twice), the
 * softmax and D stay fp32.  Accumulators are fp32 rows in shared memory,
 * since WMMA's register layout is opaque.  Same head sizes, alignment and
 * fallback as the forward, plus B*H*T floats of workspace for D. */
template <int D> struct fb_lay {
    static constexpr int ld = fa_lay<D>::ld, old = fa_lay<D>::old;
    static constexpr size_t tile = (size_t)64 * ld * 2;              /* one bf16 [64][D+8] tile */
    static constexpr size_t warp_f = (size_t)16 * FA_SLD * 4;        /* one warp's fp32 [16][68] */
    static constexpr size_t warp_h = (size_t)16 * FA_PLD * 2;        /* one warp's bf16 [16][72] */
    static constexpr size_t acc = (size_t)64 * old * 4;              /* fp32 [64][D+4] rows */
    /* four tiles, lse and D of 64 rows, S and dP (fp32), P and dS (bf16)
     * for 4 warps, then the accumulators: two (dK, dV) or one (dQ) */
    static constexpr size_t rows = 4 * tile, vec = rows + 2 * 64 * 4, sf = vec, dpf = sf + 4 * warp_f,
                            ph = dpf + 4 * warp_f, dsh = ph + 4 * warp_h, acc0 = dsh + 4 * warp_h,
                            acc1 = acc0 + acc, bytes2 = acc1 + acc, bytes1 = acc1;
};

/* One block's shared memory, this warp's parts picked out: the four tiles
 * (which is which is each kernel's), lse and D of 64 rows, this warp's
 * S, dP, P and dS, and its rows of the accumulators. */
template <int D> struct fb_view {
    kc_bf16 *tile[4];
    float *lse, *delta, *s, *dp, *acc[2];
    kc_bf16 *p, *ds;
};

template <int D> __device__ inline fb_view<D> fb_carve(unsigned char *shm, int warp)
{
    typedef fb_lay<D> L;
    fb_view<D> v;
    for (int i = 0; i < 4; i++)
        v.tile[i] = reinterpret_cast<kc_bf16 *>(shm) + i * 64 * L::ld;
    v.lse = reinterpret_cast<float *>(shm + L::rows);
    v.delta = v.lse + 64;
    v.s = reinterpret_cast<float *>(shm + L::sf) + warp * 16 * FA_SLD;
    v.dp = reinterpret_cast<float *>(shm + L::dpf) + warp * 16 * FA_SLD;
    v.p = reinterpret_cast<kc_bf16 *>(shm + L::ph) + warp * 16 * FA_PLD;
    v.ds = reinterpret_cast<kc_bf16 *>(shm + L::dsh) + warp * 16 * FA_PLD;
    v.acc[0] = reinterpret_cast<float *>(shm + L::acc0) + warp * 16 * L::old;
    v.acc[1] = reinterpret_cast<float *>(shm + L::acc1) + warp * 16 * L::old;
    return v;
}

/* D_i = sum over d of dO_i[d] O_i[d], fp32 as the CPU sums it */
__global__ void k_fa_bwd_delta(const kc_bf16 *dout, const kc_bf16 *o, float *delta, at_dims a)
{
    KC_GRID_STRIDE(row, a.B * a.H * a.T) {
        int64_t t = row % a.T, bh = row / a.T, h = bh % a.H, b = bh / a.H;
        int64_t off = at_off(a, b, t, h);
        delta[row] = at_dot2(dout + off, o + off, a.Dh);
    }
}

/* 64 rows of lse and D from t0 (0 past T) */
__device__ inline void fb_load_vec(float *lse_s, float *d_s, const float *lse, const float *delta,
                                   int64_t row0, int64_t t0, int64_t T)
{
    for (int c = threadIdx.x; c < 64; c += blockDim.x) {
        bool ok = t0 + c < T;
        lse_s[c] = ok ? lse[row0 + t0 + c] : 0.0f;
        d_s[c] = ok ? delta[row0 + t0 + c] : 0.0f;
    }
}

/* stores 16 fp32 accumulator rows (this warp's) from row t0 on, < T */
template <int D>
__device__ inline void fb_store_rows(kc_bf16 *dst, const float *acc, const at_dims &a, int64_t b,
                                     int64_t h, int64_t t0)
{
    int lane = threadIdx.x & 31;
    for (int i = lane; i < 16 * D; i += 32) {
        int r = i / D, d = i % D;
        if (t0 + r < a.T)
            kc_st(dst + at_off(a, b, t0 + r, h) + d, acc[r * fb_lay<D>::old + d]);
    }
}

template <int D>
__global__ void __launch_bounds__(128) k_fa_bwd_dkdv(const kc_bf16 *dout, const kc_bf16 *q,
                                                     const kc_bf16 *k, const kc_bf16 *v,
                                                     const float *lse, const float *delta,
                                                     kc_bf16 *dk, kc_bf16 *dv, at_dims a)
{
    typedef fb_lay<D> L;
    extern __shared__ __align__(128) unsigned char fb_shm[];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r = lane >> 1, half = lane & 1;
    fb_view<D> sv = fb_carve<D>(fb_shm, warp);
    kc_bf16 *ks = sv.tile[0], *vs = sv.tile[1], *qs = sv.tile[2], *dos = sv.tile[3], *ps = sv.p, *dss = sv.ds;
    float *lse_s = sv.lse, *d_s = sv.delta, *ss = sv.s, *dps = sv.dp, *dka = sv.acc[0], *dva = sv.acc[1];

    int64_t ntile = (a.T + 63) / 64;
    int64_t kt = (int64_t)blockIdx.x % ntile, bh = (int64_t)blockIdx.x / ntile;   /* first keys do the most */
    int64_t h = bh % a.H, b = bh / a.H, j0 = kt * 64, kj = j0 + warp * 16 + r;
    fa_load<D>(ks, k, a, b, h, j0);
    fa_load<D>(vs, v, a, b, h, j0);
    for (int i = lane; i < 16 * L::old; i += 32)
        dka[i] = dva[i] = 0.0f;

    for (int64_t i0 = j0; i0 < a.T; i0 += 64) {
        __syncthreads();   /* every warp is done with the previous Q, dO, lse, D */
        fa_load<D>(qs, q, a, b, h, i0);
        fa_load<D>(dos, dout, a, b, h, i0);
        fb_load_vec(lse_s, d_s, lse, delta, bh * a.T, i0, a.T);
        kc_cp_wait<0>();
        __syncthreads();
        fa_rows_by_tile<D>(ss, ks + warp * 16 * L::ld, qs);    /* S^T */
        fa_rows_by_tile<D>(dps, vs + warp * 16 * L::ld, dos);  /* dP^T */
        __syncwarp();
        for (int c = half; c < 64; c += 2) {
            int64_t qi = i0 + c;
            float p = kj < a.T && qi < a.T && qi >= kj ? expf(ss[r * FA_SLD + c] * a.scale - lse_s[c]) : 0.0f;
            ps[r * FA_PLD + c] = __float2bfloat16_rn(p);
            dss[r * FA_PLD + c] = __float2bfloat16_rn(p * (dps[r * FA_SLD + c] - d_s[c]) * a.scale);
        }
        __syncwarp();
        fa_acc_rows<D>(dva, ps, dos);   /* dV += P^T dO */
        fa_acc_rows<D>(dka, dss, qs);   /* dK += dS^T Q */
    }
    __syncwarp();
    fb_store_rows<D>(dk, dka, a, b, h, j0 + warp * 16);
    fb_store_rows<D>(dv, dva, a, b, h, j0 + warp * 16);
}

template <int D>
__global__ void __launch_bounds__(128) k_fa_bwd_dq(const kc_bf16 *dout, const kc_bf16 *q,
                                                   const kc_bf16 *k, const kc_bf16 *v,
                                                   const float *lse, const float *delta, kc_bf16 *dq,
                                                   at_dims a)
{
    typedef fb_lay<D> L;
    extern __shared__ __align__(128) unsigned char fb_shm[];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r = lane >> 1, half = lane & 1;
    fb_view<D> sv = fb_carve<D>(fb_shm, warp);
    kc_bf16 *qs = sv.tile[0], *dos = sv.tile[1], *ks = sv.tile[2], *vs = sv.tile[3], *dss = sv.ds;
    float *lse_s = sv.lse, *d_s = sv.delta, *ss = sv.s, *dps = sv.dp, *dqa = sv.acc[0];

    int64_t ntile = (a.T + 63) / 64;
    int64_t qt = ntile - 1 - (int64_t)blockIdx.x % ntile, bh = (int64_t)blockIdx.x / ntile;
    int64_t h = bh % a.H, b = bh / a.H, i0 = qt * 64, wr = warp * 16 + r, qi = i0 + wr;
    fa_load<D>(qs, q, a, b, h, i0);
    fa_load<D>(dos, dout, a, b, h, i0);
    fb_load_vec(lse_s, d_s, lse, delta, bh * a.T, i0, a.T);
    for (int i = lane; i < 16 * L::old; i += 32)
        dqa[i] = 0.0f;

    for (int64_t j0 = 0; j0 <= i0; j0 += 64) {
        __syncthreads();   /* every warp is done with the previous K, V */
        fa_load<D>(ks, k, a, b, h, j0);
        fa_load<D>(vs, v, a, b, h, j0);
        kc_cp_wait<0>();
        __syncthreads();
        fa_rows_by_tile<D>(ss, qs + warp * 16 * L::ld, ks);    /* S */
        fa_rows_by_tile<D>(dps, dos + warp * 16 * L::ld, vs);  /* dP */
        __syncwarp();
        for (int c = half; c < 64; c += 2) {
            int64_t kj = j0 + c;
            float p = qi < a.T && kj <= qi ? expf(ss[r * FA_SLD + c] * a.scale - lse_s[wr]) : 0.0f;
            dss[r * FA_PLD + c] = __float2bfloat16_rn(p * (dps[r * FA_SLD + c] - d_s[wr]) * a.scale);
        }
        __syncwarp();
        fa_acc_rows<D>(dqa, dss, ks);   /* dQ += dS K */
    }
    __syncwarp();
    fb_store_rows<D>(dq, dqa, a, b, h, i0 + warp * 16);
}

template <int D>
static void fb_launch(const moek_ctx *ctx, const kc_bf16 *dout, const kc_bf16 *q, const kc_bf16 *k,
                      const kc_bf16 *v, const kc_bf16 *o, const float *lse, kc_bf16 *dq, kc_bf16 *dk,
                      kc_bf16 *dv, const at_dims &a)
{
    typedef fb_lay<D> L;
    float *delta = (float *)ctx->workspace;
    int64_t rows = a.B * a.H * a.T;
    unsigned blocks = (unsigned)(a.B * a.H * ((a.T + 63) / 64));
    k_fa_bwd_delta<<<kc_blocks(rows), KCUDA_THREADS, 0, kc_stream(ctx)>>>(dout, o, delta, a);
    if (!kc_launched(ctx) ||
        !kc_ok(ctx, cudaFuncSetAttribute((const void *)k_fa_bwd_dkdv<D>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, (int)L::bytes2)) ||
        !kc_ok(ctx, cudaFuncSetAttribute((const void *)k_fa_bwd_dq<D>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, (int)L::bytes1)))
        return;
    k_fa_bwd_dkdv<D><<<blocks, 128, L::bytes2, kc_stream(ctx)>>>(dout, q, k, v, lse, delta, dk, dv, a);
    if (!kc_launched(ctx))
        return;
    k_fa_bwd_dq<D><<<blocks, 128, L::bytes1, kc_stream(ctx)>>>(dout, q, k, v, lse, delta, dq, a);
    kc_launched(ctx);
}

/* true when the tensor-core kernels took the call */
static bool fb_bwd_bf16(const moek_ctx *ctx, const kc_bf16 *dout, const kc_bf16 *q, const kc_bf16 *k,
                        const kc_bf16 *v, const kc_bf16 *o, const float *lse, kc_bf16 *dq, kc_bf16 *dk,
                        kc_bf16 *dv, int64_t B, int64_t T, int64_t H, int64_t Dh)
{
    uintptr_t al = (uintptr_t)dout | (uintptr_t)q | (uintptr_t)k | (uintptr_t)v | (uintptr_t)o |
                   (uintptr_t)dq | (uintptr_t)dk | (uintptr_t)dv;
    if (!fa_tc_shape(B, T, H, Dh, al) || !ctx->workspace ||
        ctx->workspace_bytes < B * H * T * (int64_t)sizeof(float))
        return false;
    /* the dK/dV kernel's shared memory (187 KB at Dh 128) must fit this
     * GPU's opt-in limit (227 KB on sm_90, 163 KB on sm_80) */
    int dev = 0, optin = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
        cudaGetLastError();   /* not sticky: the warp-per-row kernels run instead */
        return false;
    }
    size_t need = Dh == 16 ? fb_lay<16>::bytes2 : Dh == 32 ? fb_lay<32>::bytes2
                : Dh == 64 ? fb_lay<64>::bytes2 : fb_lay<128>::bytes2;
    if (need > (size_t)optin)
        return false;
    at_dims a = at_make(B, T, H, Dh);
    switch (Dh) {
    case 16: fb_launch<16>(ctx, dout, q, k, v, o, lse, dq, dk, dv, a); return true;
    case 32: fb_launch<32>(ctx, dout, q, k, v, o, lse, dq, dk, dv, a); return true;
    case 64: fb_launch<64>(ctx, dout, q, k, v, o, lse, dq, dk, dv, a); return true;
    case 128: fb_launch<128>(ctx, dout, q, k, v, o, lse, dq, dk, dv, a); return true;
    default: return false;
    }
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
    if (!fa_fwd_bf16(ctx, kc_bf(q), kc_bf(k), kc_bf(v), kc_bf(o), lse, B, T, H, Dh))
        kc_attention_fwd(ctx, kc_bf(q), kc_bf(k), kc_bf(v), kc_bf(o), lse, B, T, H, Dh);
}

void moek_attention_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dout, const moek_bf16 *q,
                             const moek_bf16 *k, const moek_bf16 *v, const moek_bf16 *o,
                             const float *lse, moek_bf16 *dq, moek_bf16 *dk, moek_bf16 *dv,
                             int64_t B, int64_t T, int64_t H, int64_t Dh)
{
    if (!fb_bwd_bf16(ctx, kc_bf(dout), kc_bf(q), kc_bf(k), kc_bf(v), kc_bf(o), lse, kc_bf(dq), kc_bf(dk),
                     kc_bf(dv), B, T, H, Dh))
        kc_attention_bwd(ctx, kc_bf(dout), kc_bf(q), kc_bf(k), kc_bf(v), kc_bf(o), lse, kc_bf(dq),
                         kc_bf(dk), kc_bf(dv), B, T, H, Dh);
}


/* ---- fp16 storage: the bf16 exports above instantiated with __half ---- */
void moek_attention_fwd_f16(const moek_ctx *ctx, const moek_f16 *q, const moek_f16 *k,
                             const moek_f16 *v, moek_f16 *o, float *lse, int64_t B, int64_t T,
                             int64_t H, int64_t Dh)
{
    kc_attention_fwd(ctx, kc_hf(q), kc_hf(k), kc_hf(v), kc_hf(o), lse, B, T, H, Dh);
}

void moek_attention_bwd_f16(const moek_ctx *ctx, const moek_f16 *dout, const moek_f16 *q,
                             const moek_f16 *k, const moek_f16 *v, const moek_f16 *o,
                             const float *lse, moek_f16 *dq, moek_f16 *dk, moek_f16 *dv,
                             int64_t B, int64_t T, int64_t H, int64_t Dh)
{
    kc_attention_bwd(ctx, kc_hf(dout), kc_hf(q), kc_hf(k), kc_hf(v), kc_hf(o), lse, kc_hf(dq),
                     kc_hf(dk), kc_hf(dv), B, T, H, Dh);
}

} /* extern "C" */
