/* attention.c - causal multi-head self-attention without a T x T matrix.
 *
 * Forward: one query row at a time with an online softmax (running max m,
 * running sum l, the output row itself as the accumulator), so memory is O(1)
 * beyond the output; lse = m + log l is kept for backward.
 * Backward: per (batch, head), rows t in order; the probabilities are
 * recomputed from lse: p_j = exp(s_j - lse_t), ds_j = p_j (dO_t.v_j - D_t)
 * with D_t = dO_t.O_t; dq_t = scale sum_j ds_j k_j, dk_j += scale ds_j q_t,
 * dv_j += p_j dO_t.  A (batch, head) pair is one task, so the dk/dv sums
 * never race and their order does not depend on the thread count. */
#include <math.h>

#include "kcpu.h"

static inline float kcpu_dot(const float *a, const float *b, int64_t n)
{
    float s = 0.0f;
    /* vector lanes sum in a fixed order: fast, and still deterministic */
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}

static inline void kcpu_axpy(float a, const float *x, float *y, int64_t n)
{
#pragma omp simd
    for (int64_t i = 0; i < n; i++)
        y[i] += a * x[i];
}

void moek_attention_fwd(const moek_ctx *ctx, const float *q, const float *k, const float *v,
                        float *o, float *lse, int64_t B, int64_t T, int64_t H, int64_t Dh)
{
    int64_t W = H * Dh;
    float scale = 1.0f / sqrtf((float)(Dh > 0 ? Dh : 1));
    int64_t rows = B * H * T;
#pragma omp parallel for schedule(dynamic, 16) num_threads(kcpu_team(ctx, rows * T * Dh))
    for (int64_t task = 0; task < rows; task++) {
        /* task = ((b * H) + h) * T + t */
        int64_t t = task % T, bh = task / T, h = bh % H, b = bh / H;
        const float *qt = q + (b * T + t) * W + h * Dh;
        float *ot = o + (b * T + t) * W + h * Dh;
        memset(ot, 0, (size_t)Dh * sizeof *ot);
        float m = -INFINITY, l = 0.0f;
        for (int64_t j = 0; j <= t; j++) {
            const float *kj = k + (b * T + j) * W + h * Dh;
            const float *vj = v + (b * T + j) * W + h * Dh;
            float s = kcpu_dot(qt, kj, Dh) * scale;
            if (s > m) { /* new maximum: rescale what was summed so far */
                float c = expf(m - s);
                l *= c;
                for (int64_t d = 0; d < Dh; d++)
                    ot[d] *= c;
                m = s;
            }
            float p = expf(s - m);
            l += p;
            kcpu_axpy(p, vj, ot, Dh);
        }
        float inv = 1.0f / l;
        for (int64_t d = 0; d < Dh; d++)
            ot[d] *= inv;
        lse[bh * T + t] = m + logf(l);
    }
}

void moek_attention_bwd(const moek_ctx *ctx, const float *dout, const float *q, const float *k,
                        const float *v, const float *o, const float *lse,
                        float *dq, float *dk, float *dv, int64_t B, int64_t T, int64_t H, int64_t Dh)
{
    int64_t W = H * Dh;
    float scale = 1.0f / sqrtf((float)(Dh > 0 ? Dh : 1));
#pragma omp parallel for schedule(dynamic, 1) num_threads(kcpu_team(ctx, B * H * T * T * Dh))
    for (int64_t bh = 0; bh < B * H; bh++) {
        int64_t h = bh % H, b = bh / H;
        for (int64_t t = 0; t < T; t++) {
            int64_t off = (b * T + t) * W + h * Dh;
            memset(dk + off, 0, (size_t)Dh * sizeof *dk);
            memset(dv + off, 0, (size_t)Dh * sizeof *dv);
        }
        for (int64_t t = 0; t < T; t++) {
            int64_t off = (b * T + t) * W + h * Dh;
            const float *qt = q + off, *dot_ = dout + off;
            float *dqt = dq + off;
            float L = lse[bh * T + t];
            float Dt = kcpu_dot(dot_, o + off, Dh);
            memset(dqt, 0, (size_t)Dh * sizeof *dqt);
            for (int64_t j = 0; j <= t; j++) {
                int64_t offj = (b * T + j) * W + h * Dh;
                const float *kj = k + offj, *vj = v + offj;
                float p = expf(kcpu_dot(qt, kj, Dh) * scale - L);
                float ds = p * (kcpu_dot(dot_, vj, Dh) - Dt) * scale;
                kcpu_axpy(ds, kj, dqt, Dh);
                kcpu_axpy(ds, qt, dk + offj, Dh);
                kcpu_axpy(p, dot_, dv + offj, Dh);
            }
        }
    }
}
